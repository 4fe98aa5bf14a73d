//! The video session's staged path (prepare, launch, finish) against `push`: the same images
//! bit for bit, the same anchors, in the order an overlapping caller (the element) uses it;
//! frames prepared out of turn are refused; cancel and reset between stages.

mod common;

use common::*;
use sdcrossframe::frame::RgbFrame;
use sdcrossframe::pipeline::{Cancelled, FrameSettings, MAX_STEPS};
use sdcrossframe::session::{NoiseMode, SessionConfig, VideoSession};

fn settings() -> FrameSettings {
    FrameSettings { steps: 4, strength: 0.5, ..base_settings() }
}

/// Anchors from the first frame, the interval (every 4th frame) and a scene cut; seeded
/// per-frame noise, so a frame's index shows in its output.
fn session() -> VideoSession {
    let config = SessionConfig {
        anchor_interval: 4,
        scene_cut_threshold: 0.2,
        noise: NoiseMode::PerFrame,
        seed: 7,
        size: fixture_size(),
        ..SessionConfig::default()
    };
    VideoSession::new(tiny_stylizer(), config, settings()).unwrap()
}

/// Eight frames with a scene cut at frame 7 (the inverted frame), Canny edges on even frames
/// and the fixture's control images on odd ones.
fn inputs() -> Vec<(RgbFrame, Option<RgbFrame>)> {
    (0..8)
        .map(|k| {
            let mut f = frame(k);
            if k == 7 {
                f.data.iter_mut().for_each(|v| *v = 255 - *v);
            }
            (f, (k % 2 == 1).then(|| control(k)))
        })
        .collect()
}

#[test]
fn staged_path_overlapped_matches_push_bit_for_bit() {
    let inputs = inputs();
    let mut reference = session();
    let pushed: Vec<_> = inputs.iter().map(|(f, c)| reference.push(f, c.as_ref()).unwrap()).collect();
    let reasons: Vec<_> = pushed.iter().map(|p| p.anchor_reason).collect();
    assert_eq!(
        reasons,
        [Some("first frame"), None, None, None, Some("anchor interval"), None, None, Some("scene cut")],
        "the sequence must exercise every anchor reason"
    );

    // As the element runs it: prepare N+1, finish N, launch N+1.
    let mut staged = session();
    let mut finished = Vec::new();
    let mut in_flight = None;
    for (f, c) in &inputs {
        let prepared = staged.prepare(f, c.as_ref()).unwrap();
        if let Some(previous) = in_flight.take() {
            finished.push(staged.finish(previous).unwrap());
        }
        in_flight = Some(staged.launch(prepared).unwrap());
    }
    finished.push(staged.finish(in_flight.unwrap()).unwrap());

    assert_eq!(finished.len(), pushed.len());
    for (k, (got, want)) in finished.iter().zip(&pushed).enumerate() {
        assert_eq!(got.stylized.index, k as u64);
        assert_eq!(want.index, k as u64);
        assert_eq!(max_abs_diff(&got.stylized.image, &want.image), 0.0, "frame {k}");
        assert_eq!(got.rgb, want.to_rgb().unwrap(), "frame {k}: 8-bit image");
        assert_eq!(got.stylized.anchor, want.anchor, "frame {k}");
        assert_eq!(got.stylized.anchor_reason, want.anchor_reason, "frame {k}");
        assert!(got.stylized.diffuse_time >= got.wait_time, "frame {k}");
    }
    assert_eq!(staged.frames_pushed(), reference.frames_pushed());
    assert_eq!(staged.attention().stored_bytes(), reference.attention().stored_bytes());
}

/// The order the element takes with the VAE on its own CUDA stream (prepare N+1, launch N+1,
/// finish N): the same frames as `push`. On the CPU there is no VAE stream (the session asks
/// for the other order), and switching it off changes nothing.
#[test]
fn launching_before_finishing_matches_push_bit_for_bit() {
    let inputs = inputs();
    let mut reference = session();
    let pushed: Vec<_> = inputs.iter().map(|(f, c)| reference.push(f, c.as_ref()).unwrap()).collect();
    for vae_stream in [true, false] {
        let mut staged = session();
        staged.set_vae_stream(vae_stream);
        assert!(!staged.launches_before_finishing(), "the CPU has no VAE stream");
        let mut finished = Vec::new();
        let mut in_flight = None;
        for (f, c) in &inputs {
            let prepared = staged.prepare(f, c.as_ref()).unwrap();
            let launched = staged.launch(prepared).unwrap();
            if let Some(previous) = in_flight.replace(launched) {
                finished.push(staged.finish(previous).unwrap());
            }
        }
        finished.push(staged.finish(in_flight.unwrap()).unwrap());
        assert_eq!(finished.len(), pushed.len());
        for (k, (got, want)) in finished.iter().zip(&pushed).enumerate() {
            assert_eq!(got.stylized.index, k as u64);
            assert_eq!(max_abs_diff(&got.stylized.image, &want.image), 0.0, "frame {k}");
            assert_eq!(got.rgb, want.to_rgb().unwrap(), "frame {k}: 8-bit image");
            assert_eq!(got.stylized.anchor_reason, want.anchor_reason, "frame {k}");
        }
    }
}

#[test]
fn a_frame_prepared_out_of_turn_is_refused() {
    let mut s = session();
    let first = s.prepare(&frame(0), None).unwrap();
    let second = s.prepare(&frame(1), None).unwrap();
    assert_eq!((first.index(), second.index()), (0, 0));
    assert_eq!(first.size(), (96, 64));
    let in_flight = s.launch(first).unwrap();
    let err = s.launch(second).err().expect("a frame prepared before the previous launch must be refused");
    assert!(format!("{err:#}").contains("out of turn"), "{err:#}");
    assert_eq!(s.frames_pushed(), 1);
    s.finish(in_flight).unwrap();
    // Prepared in turn, it goes.
    let again = s.prepare(&frame(1), None).unwrap();
    assert!(!s.launch(again).unwrap().anchor());
}

#[test]
fn cancel_and_reset_between_stages() {
    let mut reference = session();
    let want = reference.push(&frame(0), None).unwrap();

    let mut s = session();
    // A cancel requested before `prepare` was for an earlier frame: forgotten.
    s.cancel_handle().cancel();
    let prepared = s.prepare(&frame(0), None).unwrap();
    let in_flight = s.launch(prepared).unwrap();
    assert!(in_flight.anchor());
    assert!(!in_flight.is_asynchronous(), "the CPU computes the frame in launch");

    // Cancelled between prepare and launch: no partial state, the next frame re-anchors.
    let prepared = s.prepare(&frame(1), None).unwrap();
    s.cancel_handle().cancel();
    let err = s.launch(prepared).err().expect("the frame must be cancelled");
    assert!(err.downcast_ref::<Cancelled>().is_some(), "{err:#}");
    assert_eq!(s.frames_pushed(), 1);

    // The frame in flight still finishes, identical, after the cancel and a reset.
    s.reset();
    let done = s.finish(in_flight).unwrap();
    assert_eq!(max_abs_diff(&done.stylized.image, &want.image), 0.0);

    let prepared = s.prepare(&frame(1), None).unwrap();
    let next = s.launch(prepared).unwrap();
    assert_eq!((next.index(), next.anchor()), (1, true));
}

/// `prepare_at` takes the processing size the caller worked out (the element scales frames
/// itself): the same frame as `prepare` at that size, and a size the model cannot run is an
/// error that names it.
#[test]
fn prepare_at_a_given_size() {
    let (mut a, mut b) = (session(), session());
    let frame = frame(0);
    let size = a.processing_size(frame.width, frame.height).unwrap();
    let prepared_a = a.prepare(&frame, None).unwrap();
    let launched_a = a.launch(prepared_a).unwrap();
    let prepared_b = b.prepare_at(&frame, None, size).unwrap();
    let launched_b = b.launch(prepared_b).unwrap();
    let (ra, rb) = (a.finish(launched_a).unwrap(), b.finish(launched_b).unwrap());
    assert_eq!(ra.rgb, rb.rgb);
    let err = format!("{:#}", b.prepare_at(&frame, None, (100, 60)).err().expect("100x60 is refused"));
    assert!(err.contains("100x60") && err.contains("multiple of 8"), "{err}");
}

/// Settings and configs with NaN, an infinity or steps out of range are refused with an error
/// naming the setting and the value, and the session keeps the previous ones; steps at the
/// maximum are taken.
#[test]
fn nan_infinities_and_steps_out_of_range_are_refused() {
    let mut s = session();
    for (bad, needle) in [
        (FrameSettings { guidance_scale: f64::NAN, ..settings() }, "guidance scale must be a finite number, got NaN"),
        (
            FrameSettings { controlnet_scale: f64::INFINITY, ..settings() },
            "ControlNet scale must be a finite number, got inf",
        ),
        (FrameSettings { strength: f64::NAN, ..settings() }, "strength must be a finite number, got NaN"),
        (FrameSettings { steps: MAX_STEPS + 1, ..settings() }, "steps 501 is outside 1..=500"),
    ] {
        let err = format!("{:#}", s.set_settings(bad.clone()).unwrap_err());
        assert!(err.contains(needle), "{err}");
        assert_eq!(s.settings(), &settings());
        let err = VideoSession::new(tiny_stylizer(), SessionConfig::default(), bad).err().expect("refused");
        assert!(format!("{err:#}").contains(needle), "{err:#}");
    }
    let config = s.config().clone();
    let mut nan_canny = config.clone();
    nan_canny.canny.low = f64::NAN;
    for (bad, needle) in [
        (
            SessionConfig { scene_cut_threshold: f64::NAN, ..config.clone() },
            "scene-cut threshold must be a finite number, got NaN",
        ),
        (
            SessionConfig { skip_similarity: f64::NEG_INFINITY, ..config.clone() },
            "skip similarity must be a finite number, got -inf",
        ),
        (nan_canny, "Canny low threshold must be a finite number, got NaN"),
    ] {
        let err = format!("{:#}", s.set_config(bad).unwrap_err());
        assert!(err.contains(needle), "{err}");
        assert_eq!(s.config(), &config);
    }
    // 500 x 0.004: 2 steps of the tiny model's leading schedule (steps_offset 1).
    s.set_settings(FrameSettings { steps: MAX_STEPS, strength: 0.004, ..settings() }).unwrap();
    s.push(&frame(0), None).unwrap();
}

/// The anchor after a reset gives the reason the caller named ("flush" for the element's
/// flushing seek), or "reset".
#[test]
fn a_reset_names_the_next_anchor() {
    let mut s = session();
    assert_eq!(s.push(&frame(0), None).unwrap().anchor_reason, Some("first frame"));
    assert_eq!(s.push(&frame(1), None).unwrap().anchor_reason, None);
    s.reset_with_reason("flush");
    assert_eq!(s.push(&frame(2), None).unwrap().anchor_reason, Some("flush"));
    s.reset();
    assert_eq!(s.push(&frame(3), None).unwrap().anchor_reason, Some("reset"));
}
