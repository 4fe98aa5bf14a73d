//! Cross-frame attention and the video session: parity with the original technique
//! (re-implemented on diffusers with the cache keyed by step index), identities, bounded
//! memory, re-anchoring.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use sdcrossframe::cross_frame::{AttentionMode, AttentionScope, StoreLocation};
use sdcrossframe::pipeline::{FrameSettings, GuidanceMode, PlainFrame, SizeRequest};
use sdcrossframe::scheduler::SchedulerChoice;
use sdcrossframe::session::{SessionConfig, VideoSession};

const FRAMES: usize = 6;

fn session(mode: AttentionMode, scope: AttentionScope) -> VideoSession {
    let config = SessionConfig {
        attention: mode,
        scope,
        scene_cut_threshold: 0.0,
        size: fixture_size(),
        ..SessionConfig::default()
    };
    let mut session = VideoSession::new(tiny_stylizer(), config, base_settings()).unwrap();
    session.set_noise(Some(fixture_noise()));
    session
}

fn run(session: &mut VideoSession, frames: usize) -> Vec<Tensor> {
    (0..frames).map(|k| session.push(&frame(k), Some(&control(k))).unwrap().image).collect()
}

fn reference(mode: &str, scope: &str) -> Vec<Tensor> {
    let path = fixtures().join(format!("reference/cross_frame/{mode}_{scope}.safetensors"));
    let tensors = load_tensors(&path);
    (0..FRAMES).map(|k| tensors[&format!("frame_{k}")].clone()).collect()
}

fn check_parity(mode: AttentionMode, scope: AttentionScope) {
    let name = mode.to_string().replace('+', "_");
    let want = reference(&name, &scope.to_string());
    assert_frames_match(&format!("{mode} {scope}"), &run(&mut session(mode, scope), FRAMES), &want);
}

/// Every frame within the parity tolerance of its reference; `label` names the run.
fn assert_frames_match(label: &str, got: &[Tensor], want: &[Tensor]) {
    assert_eq!(got.len(), want.len(), "{label}: frame count");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let err = max_abs_diff(g, w);
        println!("{label} frame {k}: max abs error {err:.2e}");
        assert!(err <= IMAGE_TOLERANCE, "{label} frame {k}: {err:.2e} over {IMAGE_TOLERANCE}");
    }
}

#[test]
fn first_prev_up_matches_reference() {
    check_parity(AttentionMode::FirstPrev, AttentionScope::Up);
}

#[test]
fn first_up_matches_reference() {
    check_parity(AttentionMode::First, AttentionScope::Up);
}

#[test]
fn prev_up_matches_reference() {
    check_parity(AttentionMode::Prev, AttentionScope::Up);
}

#[test]
fn first_prev_all_matches_reference() {
    check_parity(AttentionMode::FirstPrev, AttentionScope::All);
}

#[test]
fn first_all_matches_reference() {
    check_parity(AttentionMode::First, AttentionScope::All);
}

#[test]
fn prev_all_matches_reference() {
    check_parity(AttentionMode::Prev, AttentionScope::All);
}

/// Parity tells modes apart only if they produce visibly different frames.
#[test]
fn modes_differ_far_beyond_tolerance_in_the_reference() {
    for scope in ["up", "all"] {
        let modes = ["off", "first", "prev", "first_prev"].map(|m| (m, reference(m, scope)));
        for (i, (a, fa)) in modes.iter().enumerate() {
            for (b, fb) in &modes[i + 1..] {
                let diff = (2..FRAMES).map(|k| max_abs_diff(&fa[k], &fb[k])).fold(0f32, f32::max);
                println!("{scope}: {a} vs {b}: {diff:.3}");
                assert!(diff >= 20.0 * IMAGE_TOLERANCE, "{scope}: {a} and {b} differ by only {diff}");
            }
        }
    }
}

#[test]
fn off_reproduces_single_frame_img2img_exactly() {
    let mut plain = tiny_stylizer();
    let settings = base_settings();
    let mut session = session(AttentionMode::Off, AttentionScope::Up);
    for k in 0..3 {
        let from_session = session.push(&frame(k), Some(&control(k))).unwrap().image;
        let single = plain
            .stylize(
                &frame(k).to_tensor(&Device::Cpu).unwrap(),
                &control(k).to_tensor(&Device::Cpu).unwrap(),
                &settings,
                &fixture_noise(),
                None,
                &mut PlainFrame::default(),
            )
            .unwrap();
        assert_eq!(max_abs_diff(&from_session, &single), 0.0, "frame {k}");
    }
}

/// For frame 1, first == prev, and attending to [x0; x0] equals attending to x0.
#[test]
fn frame_one_under_first_prev_equals_first() {
    let a = run(&mut session(AttentionMode::FirstPrev, AttentionScope::Up), 2);
    let b = run(&mut session(AttentionMode::First, AttentionScope::Up), 2);
    let same = max_abs_diff(&a[1], &b[1]);
    println!("frame 1 first+prev vs first: {same:.2e}");
    assert!(same <= 1e-5, "frame 1 differs by {same}");
    // Frame 0 is the anchor: plain attention in every mode.
    assert_eq!(max_abs_diff(&a[0], &b[0]), 0.0);
}

/// Cheap settings for the long-running behaviour tests.
fn quick_settings() -> FrameSettings {
    FrameSettings { steps: 4, strength: 0.5, ..base_settings() }
}

fn quick_session(config: SessionConfig) -> VideoSession {
    let mut s = VideoSession::new(tiny_stylizer(), config, quick_settings()).unwrap();
    s.set_noise(Some(fixture_noise()));
    s
}

/// The host location (issue 17's memory): the same frames as the device location, exactly,
/// hence the reference's; the device holds one step's entries (the staging buffers) while the
/// host holds them all; moving the store re-anchors.
#[test]
fn the_store_on_the_host_gives_the_same_frames_and_keeps_one_step_on_the_device() {
    let config = SessionConfig {
        attention: AttentionMode::FirstPrev,
        scope: AttentionScope::Up,
        store: StoreLocation::Host,
        scene_cut_threshold: 0.0,
        size: fixture_size(),
        ..SessionConfig::default()
    };
    let mut host = VideoSession::new(tiny_stylizer(), config, base_settings()).unwrap();
    host.set_noise(Some(fixture_noise()));
    let got = run(&mut host, FRAMES);
    assert_frames_match("first+prev up, store on the host", &got, &reference("first_prev", "up"));
    let on_device = run(&mut session(AttentionMode::FirstPrev, AttentionScope::Up), FRAMES);
    for (k, (h, d)) in got.iter().zip(&on_device).enumerate() {
        assert_eq!(max_abs_diff(h, d), 0.0, "frame {k}: the host store changes nothing");
    }
    let store = host.attention();
    // The tiny model's 6 up-block self-attention layers per step.
    let steps = store.stored_entries() / 6;
    assert!(steps >= 2, "{} entries", store.stored_entries());
    assert_eq!(store.held_bytes() * steps, store.stored_bytes(), "the device holds one step's entries");

    let mut session =
        quick_session(SessionConfig { scene_cut_threshold: 0.0, size: fixture_size(), ..SessionConfig::default() });
    assert!(session.push(&frame(0), Some(&control(0))).unwrap().anchor);
    assert!(!session.push(&frame(1), Some(&control(1))).unwrap().anchor);
    let device_bytes = session.attention().stored_bytes();
    session.set_config(SessionConfig { store: StoreLocation::Host, ..session.config().clone() }).unwrap();
    assert!(session.push(&frame(2), Some(&control(2))).unwrap().anchor, "a moved store re-anchors");
    assert!(!session.push(&frame(3), Some(&control(3))).unwrap().anchor);
    assert_eq!(session.attention().location(), StoreLocation::Host);
    assert_eq!(session.attention().stored_bytes(), device_bytes, "the same entries, kept on the host");
}

/// Residual guidance's `initialize` runs 2 rows at the first step and 1 after: the host store's
/// staging buffers follow each step's rows, sequentially and with the stream batch, and the
/// frames stay those of the store on the device.
#[test]
fn the_store_on_the_host_follows_steps_of_different_batches() {
    let settings = FrameSettings { guidance: GuidanceMode::Initialize, guidance_scale: 2.0, ..lcm_settings() };
    let run_with = |store: StoreLocation, stream_batch: bool| {
        let config = SessionConfig {
            store,
            stream_batch,
            scene_cut_threshold: 0.0,
            size: fixture_size(),
            ..SessionConfig::default()
        };
        let mut session = VideoSession::new(tiny_stylizer(), config, settings.clone()).unwrap();
        let mut frames = Vec::new();
        for k in 0..4 {
            if stream_batch {
                frames.extend(session.push_stream(&frame(k), Some(&control(k))).unwrap());
            } else {
                frames.push(session.push(&frame(k), Some(&control(k))).unwrap());
            }
        }
        frames.extend(session.drain_stylized().unwrap());
        frames.into_iter().map(|f| f.image).collect::<Vec<_>>()
    };
    for stream_batch in [false, true] {
        let on_device = run_with(StoreLocation::Device, stream_batch);
        let on_host = run_with(StoreLocation::Host, stream_batch);
        assert_eq!((on_device.len(), on_host.len()), (4, 4), "stream batch {stream_batch}");
        for (k, (h, d)) in on_host.iter().zip(&on_device).enumerate() {
            assert_eq!(max_abs_diff(h, d), 0.0, "stream batch {stream_batch}, frame {k}");
        }
    }
}

#[test]
fn store_stays_constant_over_fifty_frames_and_reset_reanchors() {
    let mut session =
        quick_session(SessionConfig { scene_cut_threshold: 0.0, size: fixture_size(), ..SessionConfig::default() });
    let first = session.push(&frame(0), Some(&control(0))).unwrap();
    assert!(first.anchor);
    let entries = session.attention().stored_entries();
    let bytes = session.attention().stored_bytes();
    // 2 steps x 6 up-block self-attention layers of the tiny model.
    assert_eq!(entries, 2 * 6);
    assert!(bytes > 0);
    for i in 1..50 {
        let out = session.push(&frame(i % 8), Some(&control(i % 8))).unwrap();
        assert!(!out.anchor, "frame {i} re-anchored without a reason");
        assert_eq!(session.attention().stored_entries(), entries, "frame {i}");
        assert_eq!(session.attention().stored_bytes(), bytes, "frame {i}");
    }
    session.reset();
    assert!(session.push(&frame(1), Some(&control(1))).unwrap().anchor, "reset must make the next frame an anchor");
    assert!(!session.push(&frame(2), Some(&control(2))).unwrap().anchor);
}

#[test]
fn scene_cut_and_anchor_interval_reanchor() {
    let mut session =
        quick_session(SessionConfig { scene_cut_threshold: 0.2, size: fixture_size(), ..SessionConfig::default() });
    assert!(session.push(&frame(0), Some(&control(0))).unwrap().anchor);
    assert!(!session.push(&frame(1), Some(&control(1))).unwrap().anchor, "consecutive frames are no cut");
    let inverted = {
        let mut f = frame(2);
        f.data.iter_mut().for_each(|v| *v = 255 - *v);
        f
    };
    let cut = session.push(&inverted, Some(&control(2))).unwrap();
    assert!(cut.anchor);
    assert_eq!(cut.anchor_reason, Some("scene cut"));

    let mut session = quick_session(SessionConfig {
        anchor_interval: 3,
        scene_cut_threshold: 0.0,
        size: fixture_size(),
        ..SessionConfig::default()
    });
    let anchors: Vec<bool> = (0..7).map(|k| session.push(&frame(k), Some(&control(k))).unwrap().anchor).collect();
    assert_eq!(anchors, [true, false, false, true, false, false, true]);
}

#[test]
fn size_or_schedule_change_reanchors() {
    // Height fixed, width from the aspect ratio: the fixture frames keep 96x64, a 64x48 frame
    // is processed at 88x64.
    let size = SizeRequest { width: 0, height: 64 };
    let mut session = quick_session(SessionConfig { scene_cut_threshold: 0.0, size, ..SessionConfig::default() });
    session.set_noise(None); // seeded noise follows the frame size
    assert!(session.push(&frame(0), Some(&control(0))).unwrap().anchor);
    assert!(!session.push(&frame(1), Some(&control(1))).unwrap().anchor);
    let smaller = frame(2).resized(64, 48).unwrap();
    let out = session.push(&smaller, Some(&control(2).resized(64, 48).unwrap())).unwrap();
    assert!(out.anchor, "a frame of another size must re-anchor");
    assert_eq!(out.image.dims(), &[1, 3, 64, 88]);
    assert!(!session.push(&smaller, Some(&control(2).resized(64, 48).unwrap())).unwrap().anchor);
    session.set_settings(FrameSettings { steps: 6, ..quick_settings() }).unwrap();
    let out = session.push(&smaller, Some(&control(2).resized(64, 48).unwrap())).unwrap();
    assert!(out.anchor, "a schedule change must re-anchor");
}

#[test]
fn zero_denoising_steps_and_bad_noise_are_errors() {
    let mut session = quick_session(SessionConfig { size: fixture_size(), ..SessionConfig::default() });
    let err = session.set_settings(FrameSettings { steps: 3, strength: 0.2, ..quick_settings() }).unwrap_err();
    assert!(format!("{err:#}").contains("0 denoising steps"), "{err:#}");
    // The session keeps its previous, valid settings.
    assert_eq!(session.settings().steps, 4);
    session.set_noise(Some(Tensor::zeros((1, 4, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap()));
    let err = session.push(&frame(0), Some(&control(0))).err().expect("wrong noise shape must fail");
    assert!(format!("{err:#}").contains("noise"), "{err:#}");
    assert_eq!(session.frames_pushed(), 0, "a failed frame is not counted");
}

#[test]
fn empty_session_resets_cleanly() {
    let mut session = quick_session(SessionConfig { size: fixture_size(), ..SessionConfig::default() });
    assert_eq!(session.frames_pushed(), 0);
    assert_eq!(session.attention().stored_entries(), 0);
    session.reset();
    assert!(session.push(&frame(0), Some(&control(0))).unwrap().anchor);
}

#[test]
fn cancel_stops_a_frame_between_steps_and_the_next_frame_reanchors() {
    let mut session = quick_session(SessionConfig { size: fixture_size(), ..SessionConfig::default() });
    assert!(session.push(&frame(0), Some(&control(0))).unwrap().anchor);
    // A long frame (about 10 s on the tiny model) to cancel early.
    session.set_settings(FrameSettings { steps: 100, strength: 1.0, ..quick_settings() }).unwrap();
    let started = std::time::Instant::now();
    let handle = session.cancel_handle();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        handle.cancel();
    });
    let err = session.push(&frame(1), Some(&control(1))).err().expect("the frame must be cancelled");
    canceller.join().unwrap();
    println!("cancelled after {:?}", started.elapsed());
    assert!(err.downcast_ref::<sdcrossframe::pipeline::Cancelled>().is_some(), "{err:#}");
    assert_eq!(session.frames_pushed(), 1);
    // The cancelled frame left no partial state: the next frame is a clean anchor.
    session.set_settings(quick_settings()).unwrap();
    assert!(session.push(&frame(2), Some(&control(2))).unwrap().anchor);
}

// ---------------------------------------------------------------------------------------
// Under LCM (tests/reference/make_lcm_fixtures.py): 4 steps x strength 0.5 = timesteps 499,
// 259, guidance 1, the fixture's start noise and step noise for every frame.

const LCM_FRAMES: usize = 3;

fn lcm_settings() -> FrameSettings {
    FrameSettings {
        scheduler: SchedulerChoice::Lcm,
        steps: 4,
        strength: 0.5,
        guidance_scale: 1.0,
        controlnet_scale: 0.7,
        ..base_settings()
    }
}

fn lcm_session(mode: AttentionMode, scope: AttentionScope) -> VideoSession {
    let config = SessionConfig {
        attention: mode,
        scope,
        scene_cut_threshold: 0.0,
        size: fixture_size(),
        ..SessionConfig::default()
    };
    let mut session = VideoSession::new(tiny_stylizer(), config, lcm_settings()).unwrap();
    let noise = load_tensors(&fixtures().join("reference/lcm/noise.safetensors"));
    session.set_noise(Some(noise["noise"].clone()));
    session.set_step_noise(Some(noise["step_noise"].clone()));
    session
}

fn lcm_reference(name: &str) -> Vec<Tensor> {
    let tensors = load_tensors(&fixtures().join(format!("reference/lcm/cross_frame_{name}.safetensors")));
    (0..LCM_FRAMES).map(|k| tensors[&format!("frame_{k}")].clone()).collect()
}

fn check_lcm_parity(mode: AttentionMode, scope: AttentionScope) {
    let name = format!("{}_{scope}", mode.to_string().replace('+', "_"));
    let want = lcm_reference(&name);
    assert_frames_match(&format!("lcm {mode} {scope}"), &run(&mut lcm_session(mode, scope), LCM_FRAMES), &want);
}

#[test]
fn lcm_off_matches_reference() {
    check_lcm_parity(AttentionMode::Off, AttentionScope::Up);
}

#[test]
fn lcm_first_up_matches_reference() {
    check_lcm_parity(AttentionMode::First, AttentionScope::Up);
}

#[test]
fn lcm_prev_up_matches_reference() {
    check_lcm_parity(AttentionMode::Prev, AttentionScope::Up);
}

#[test]
fn lcm_first_prev_up_matches_reference() {
    check_lcm_parity(AttentionMode::FirstPrev, AttentionScope::Up);
}

#[test]
fn lcm_first_prev_all_matches_reference() {
    check_lcm_parity(AttentionMode::FirstPrev, AttentionScope::All);
}

#[test]
fn lcm_modes_differ_far_beyond_tolerance_in_the_reference() {
    let names = ["off_up", "first_up", "prev_up", "first_prev_up", "first_prev_all"];
    let videos: Vec<_> = names.iter().map(|n| lcm_reference(n)).collect();
    for i in 0..names.len() {
        for j in i + 1..names.len() {
            let diff = max_abs_diff(&videos[i][2], &videos[j][2]);
            println!("lcm frame 2: {} vs {}: {diff:.3}", names[i], names[j]);
            assert!(diff >= 20.0 * IMAGE_TOLERANCE, "{} and {} differ by only {diff}", names[i], names[j]);
        }
    }
}

/// The cross-frame store is reused only between equal plans: the scheduler and the guidance
/// batch are part of it. Seeded step noise is fixed per session (same frame, same output).
#[test]
fn scheduler_or_guidance_batch_change_reanchors_and_step_noise_is_fixed() {
    let config = SessionConfig { scene_cut_threshold: 0.0, size: fixture_size(), ..SessionConfig::default() };
    let mut session = VideoSession::new(tiny_stylizer(), config.clone(), lcm_settings()).unwrap();
    assert!(session.push(&frame(0), Some(&control(0))).unwrap().anchor);
    assert!(!session.push(&frame(1), Some(&control(1))).unwrap().anchor);
    let guided = FrameSettings { guidance_scale: 2.0, guidance: GuidanceMode::SelfNegative, ..lcm_settings() };
    session.set_settings(guided.clone()).unwrap();
    assert!(!session.push(&frame(2), Some(&control(2))).unwrap().anchor, "self guidance keeps batch 1");
    session.set_settings(FrameSettings { guidance: GuidanceMode::Initialize, ..guided }).unwrap();
    assert!(session.push(&frame(3), Some(&control(3))).unwrap().anchor, "initialize has batch 2 at step 0");
    session.set_settings(FrameSettings { scheduler: SchedulerChoice::Ddim, ..lcm_settings() }).unwrap();
    assert!(session.push(&frame(4), Some(&control(4))).unwrap().anchor, "another scheduler re-anchors");

    let off = SessionConfig { attention: AttentionMode::Off, ..config };
    let mut session = VideoSession::new(tiny_stylizer(), off.clone(), lcm_settings()).unwrap();
    let a = session.push(&frame(0), Some(&control(0))).unwrap().image;
    let b = session.push(&frame(0), Some(&control(0))).unwrap().image;
    assert_eq!(max_abs_diff(&a, &b), 0.0, "fixed noise: the same frame gives the same output");
    let per_frame = SessionConfig { noise: sdcrossframe::session::NoiseMode::PerFrame, ..off };
    let mut session = VideoSession::new(tiny_stylizer(), per_frame, lcm_settings()).unwrap();
    let a = session.push(&frame(0), Some(&control(0))).unwrap().image;
    let b = session.push(&frame(0), Some(&control(0))).unwrap().image;
    assert!(max_abs_diff(&a, &b) > 0.05, "per-frame noise: fresh noise every frame");
}
