//! Stream batch (issue 14): frames denoised together, each at its own step, must give the
//! frames and the cross-frame state of the sequential session: every attention mode, 2 and 4
//! steps, guidance batches of 1 and 2 rows, LCM's step noise and residual guidance, with a
//! scene cut and a flush in the middle; frame order and count at start, drain and flush.

mod common;

use common::*;
use sdcrossframe::cross_frame::{AttentionMode, AttentionScope};
use sdcrossframe::frame::RgbFrame;
use sdcrossframe::pipeline::{FrameSettings, GuidanceMode};
use sdcrossframe::scheduler::SchedulerChoice;
use sdcrossframe::session::{SessionConfig, StylizedFrame, VideoSession};

/// Stream-batched frames against sequential ones, per pixel in [0, 1] (the bound).
const STREAM_TOLERANCE: f32 = 1e-4;
/// Frames of a run; the scene cut enters at `SCENE_CUT`, the flush comes before `FLUSH_AT`.
const FRAMES: usize = 12;
const SCENE_CUT: usize = 6;
const FLUSH_AT: usize = 9;

/// The fixture frames, then (from `SCENE_CUT`) their negatives: a cut the luma measure sees.
fn input(k: usize) -> RgbFrame {
    if k < SCENE_CUT {
        return frame(k);
    }
    let mut f = frame(k - SCENE_CUT);
    f.data.iter_mut().for_each(|v| *v = 255 - *v);
    f
}

fn settings(steps: usize) -> FrameSettings {
    // DDIM over 8 steps at strength steps/8 runs the last `steps`; full guidance (batch 2).
    FrameSettings { steps: 8, strength: steps as f64 / 8.0, ..base_settings() }
}

fn lcm_settings(guidance: GuidanceMode) -> FrameSettings {
    FrameSettings {
        scheduler: SchedulerChoice::Lcm,
        steps: 4,
        strength: 1.0,
        guidance,
        guidance_scale: 1.5,
        ..base_settings()
    }
}

fn session(mode: AttentionMode, settings: FrameSettings, stream_batch: bool) -> VideoSession {
    let config = SessionConfig {
        attention: mode,
        scope: AttentionScope::Up,
        scene_cut_threshold: 0.2,
        size: fixture_size(),
        stream_batch,
        ..SessionConfig::default()
    };
    VideoSession::new(tiny_stylizer(), config, settings).unwrap()
}

/// Every frame one at a time; the flush is a reset before `FLUSH_AT`.
fn sequential(mode: AttentionMode, settings: FrameSettings) -> Vec<StylizedFrame> {
    let mut s = session(mode, settings, false);
    (0..FRAMES)
        .map(|k| {
            if k == FLUSH_AT {
                s.reset();
            }
            s.push(&input(k), None).unwrap()
        })
        .collect()
}

/// The same frames stream-batched; the flush drains the batch (its frames come out) and
/// resets; the end drains.
fn streamed(mode: AttentionMode, settings: FrameSettings) -> (Vec<StylizedFrame>, usize) {
    let mut s = session(mode, settings, true);
    let delay = s.output_delay().unwrap();
    let mut out = Vec::new();
    for k in 0..FRAMES {
        if k == FLUSH_AT {
            out.extend(s.drain_stylized().unwrap());
            assert_eq!(s.frames_in_flight(), 0);
            s.reset();
        }
        let came_out = s.push_stream(&input(k), None).unwrap();
        // Filling: nothing comes out for the first `delay` frames (after start and flush).
        let since_start = if k >= FLUSH_AT { k - FLUSH_AT } else { k };
        assert_eq!(came_out.len(), usize::from(since_start >= delay), "frame {k}: frames out");
        out.extend(came_out);
    }
    assert_eq!(s.frames_in_flight(), delay);
    out.extend(s.drain_stylized().unwrap());
    (out, delay)
}

fn check(label: &str, mode: AttentionMode, settings: FrameSettings, expected_delay: usize) {
    let want = sequential(mode, settings.clone());
    let (got, delay) = streamed(mode, settings);
    assert_eq!(delay, expected_delay, "{label}: steps - 1");
    assert_eq!(got.len(), FRAMES, "{label}: every frame comes out once");
    let mut worst = 0f32;
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.index, k as u64, "{label}: frames come out in order");
        assert_eq!(
            (g.anchor, g.anchor_reason),
            (w.anchor, w.anchor_reason),
            "{label} frame {k}: anchor as in the sequential session"
        );
        let err = max_abs_diff(&g.image, &w.image);
        worst = worst.max(err);
        assert!(err <= STREAM_TOLERANCE, "{label} frame {k}: {err:.2e} from the sequential frame");
    }
    println!("{label}: largest difference from the sequential frames {worst:.2e}");
    if mode != AttentionMode::Off {
        let anchors: Vec<_> = want.iter().filter(|f| f.anchor).map(|f| (f.index, f.anchor_reason.unwrap())).collect();
        assert_eq!(
            anchors,
            vec![(0, "first frame"), (SCENE_CUT as u64, "scene cut"), (FLUSH_AT as u64, "reset")],
            "{label}: the run re-anchors where the test means it to"
        );
    }
}

#[test]
fn stream_batch_equals_sequential_ddim_two_steps_every_mode() {
    for mode in [AttentionMode::Off, AttentionMode::First, AttentionMode::Prev, AttentionMode::FirstPrev] {
        check(&format!("{mode}, 2 steps"), mode, settings(2), 1);
    }
}

#[test]
fn stream_batch_equals_sequential_ddim_four_steps_every_mode() {
    for mode in [AttentionMode::Off, AttentionMode::First, AttentionMode::Prev, AttentionMode::FirstPrev] {
        check(&format!("{mode}, 4 steps"), mode, settings(4), 3);
    }
}

#[test]
fn stream_batch_equals_sequential_lcm_with_step_noise_and_residual_guidance() {
    for guidance in [GuidanceMode::None, GuidanceMode::SelfNegative, GuidanceMode::Initialize] {
        check(&format!("lcm {guidance}"), AttentionMode::FirstPrev, lcm_settings(guidance), 3);
    }
}

/// The comparison can fail: a stream batch whose frames all read the anchor's step-0
/// entries (what mixing steps would do) differs by far more than the tolerance. Here: the
/// sequential frames against themselves with another attention mode.
#[test]
fn the_tolerance_tells_attention_modes_apart() {
    let a = sequential(AttentionMode::FirstPrev, settings(2));
    let b = sequential(AttentionMode::First, settings(2));
    let worst = a.iter().zip(&b).skip(1).map(|(x, y)| max_abs_diff(&x.image, &y.image)).fold(0f32, f32::max);
    assert!(worst > 100.0 * STREAM_TOLERANCE, "modes differ by only {worst:.2e}");
}

/// A settings change drains the batch before the changed frame enters; a size change too.
#[test]
fn changed_settings_drain_the_batch_first() {
    let mut s = session(AttentionMode::FirstPrev, settings(4), true);
    let mut out: Vec<u64> = Vec::new();
    for k in 0..5 {
        out.extend(s.push_stream(&input(k), None).unwrap().iter().map(|f| f.index));
    }
    assert_eq!(out, vec![0, 1]);
    s.set_settings(FrameSettings { prompt: "another prompt".into(), ..settings(4) }).unwrap();
    let drained: Vec<u64> = s.push_stream(&input(5), None).unwrap().iter().map(|f| f.index).collect();
    assert_eq!(drained, vec![2, 3, 4], "the three frames in flight come out before frame 5 enters");
    assert_eq!(s.frames_in_flight(), 1);
    let rest: Vec<u64> = s.drain_stylized().unwrap().iter().map(|f| f.index).collect();
    assert_eq!(rest, vec![5]);
}

/// A reset with frames in flight drops them (a flush), and the next frame is an anchor.
#[test]
fn reset_drops_the_frames_in_flight() {
    let mut s = session(AttentionMode::FirstPrev, settings(4), true);
    for k in 0..3 {
        assert!(s.push_stream(&input(k), None).unwrap().is_empty());
    }
    s.reset();
    assert_eq!(s.frames_in_flight(), 0);
    assert!(s.drain_stylized().unwrap().is_empty());
    let mut out = Vec::new();
    for k in 3..7 {
        out.extend(s.push_stream(&input(k), None).unwrap());
    }
    out.extend(s.drain_stylized().unwrap());
    let indices: Vec<u64> = out.iter().map(|f| f.index).collect();
    assert_eq!(indices, vec![3, 4, 5, 6]);
    assert!(out[0].anchor, "the first frame after a reset is an anchor");
}

/// `launch` and `push` run one frame at a time and say so with stream batch on.
#[test]
fn one_frame_calls_refuse_a_stream_batch() {
    let mut s = session(AttentionMode::FirstPrev, settings(2), true);
    let err = s.push(&input(0), None).err().expect("push refuses");
    assert!(format!("{err:#}").contains("stream batch is on"), "{err:#}");
}

fn skipping_session(stream_batch: bool, max_skip: usize) -> VideoSession {
    let config = SessionConfig {
        attention: AttentionMode::FirstPrev,
        size: fixture_size(),
        stream_batch,
        skip_similarity: 0.98,
        max_skip,
        ..SessionConfig::default()
    };
    VideoSession::new(tiny_stylizer(), config, settings(2)).unwrap()
}

/// Runs `inputs` through a session and drains it: every frame that came out, in order.
fn run_all(s: &mut VideoSession, inputs: &[RgbFrame]) -> Vec<StylizedFrame> {
    let mut out = Vec::new();
    for f in inputs {
        out.extend(s.push_stream(f, None).unwrap());
    }
    out.extend(s.drain_stylized().unwrap());
    out
}

/// A repeated frame is skipped (its output is the last diffused frame's), at most `max-skip`
/// in a row; a different frame is diffused. With and without stream batch.
#[test]
fn similarity_skipping_skips_repeats_up_to_max_skip() {
    let inputs: Vec<RgbFrame> = [0, 0, 0, 0, 0, 0, 0, 0, 3, 3].iter().map(|&k| input(k)).collect();
    let different = {
        let mut f = input(SCENE_CUT + 3);
        f.data.iter_mut().for_each(|v| *v = 255 - *v / 2);
        f
    };
    for stream_batch in [false, true] {
        let mut s = skipping_session(stream_batch, 3);
        let mut all = inputs.clone();
        all.insert(5, different.clone());
        let out = run_all(&mut s, &all);
        let label = if stream_batch { "stream batch" } else { "one at a time" };
        assert_eq!(out.len(), all.len(), "{label}: one frame out per frame in");
        assert!(out.iter().enumerate().all(|(k, f)| f.index == k as u64), "{label}: in order");
        let skipped: Vec<bool> = out.iter().map(|f| f.skipped).collect();
        // 0 diffused; 1..3 repeats skipped; 4 the fourth repeat: max-skip reached, diffused;
        // 5 a different frame: diffused; 6 (frame 0 again, unlike 5): diffused; 7, 8 skipped;
        // 9 frame 3 (similar to 0 or not, it is drawn), 10 a repeat of 9.
        assert_eq!(&skipped[..9], &[false, true, true, true, false, false, false, true, true], "{label}: skip pattern");
        assert_eq!(s.frames_skipped(), skipped.iter().filter(|&&k| k).count() as u64);
        for (k, f) in out.iter().enumerate().filter(|(_, f)| f.skipped) {
            let source = out[..k].iter().rev().find(|g| !g.skipped).unwrap();
            assert_eq!(max_abs_diff(&f.image, &source.image), 0.0, "{label}: frame {k} re-emits the last output");
        }
        assert!(max_abs_diff(&out[5].image, &out[4].image) > 1e-2, "{label}: the different frame is diffused anew");
    }
}

/// Skipping is drawn from the seed and the frame index: the same run skips the same frames.
#[test]
fn similarity_skipping_repeats_with_the_seed() {
    let inputs: Vec<RgbFrame> = (0..SCENE_CUT).map(input).collect();
    let pattern = |seed: u64| {
        let mut s = skipping_session(false, 10);
        let mut config = s.config().clone();
        config.skip_similarity = 0.9;
        config.seed = seed;
        s.set_config(config).unwrap();
        run_all(&mut s, &inputs).iter().map(|f| f.skipped).collect::<Vec<_>>()
    };
    assert_eq!(pattern(7), pattern(7));
    println!("skip pattern at similarity 0.9, seed 7: {:?}", pattern(7));
}

#[test]
fn skipping_is_off_by_default() {
    let mut s = session(AttentionMode::FirstPrev, settings(2), false);
    let out = run_all(&mut s, &[input(0), input(0), input(0)]);
    assert!(out.iter().all(|f| !f.skipped));
    assert_eq!(s.frames_skipped(), 0);
}
