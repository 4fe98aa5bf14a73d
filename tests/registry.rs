//! The process-wide model registry: sessions that ask for the same models share one loaded
//! copy (loaded once, counted by `registry::loads`), and each still gives exactly the frames
//! it gives alone (its own prompt cache, cross-frame store, noise and anchors), run interleaved
//! frame by frame or on two threads at once; dropping one leaves the other working; the last
//! user's drop frees the copy; instance ids force separate copies, and an id asked for with
//! other settings is an error naming it.

mod common;

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use common::*;
use sdcrossframe::cross_frame::AttentionMode;
use sdcrossframe::pipeline::{FrameSettings, ModelSpec, Stylizer, registry};
use sdcrossframe::session::{NoiseMode, SessionConfig, VideoSession};

const FRAMES: usize = 6;

/// The load counter is process-wide: the tests of this file take turns.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Two streams that differ in everything a session keeps for itself.
fn stream_a() -> (SessionConfig, FrameSettings) {
    let config = SessionConfig {
        attention: AttentionMode::FirstPrev,
        anchor_interval: 4,
        noise: NoiseMode::PerFrame,
        seed: 7,
        size: fixture_size(),
        ..SessionConfig::default()
    };
    (config, FrameSettings { steps: 4, strength: 0.5, ..base_settings() })
}

fn stream_b() -> (SessionConfig, FrameSettings) {
    let config = SessionConfig {
        attention: AttentionMode::Prev,
        noise: NoiseMode::Fixed,
        seed: 3,
        size: fixture_size(),
        ..SessionConfig::default()
    };
    let settings = FrameSettings {
        prompt: "a watercolor city at night".into(),
        negative_prompt: "blurry".into(),
        steps: 3,
        strength: 0.6,
        guidance_scale: 5.0,
        ..base_settings()
    };
    (config, settings)
}

fn session(stylizer: Stylizer, (config, settings): (SessionConfig, FrameSettings)) -> VideoSession {
    VideoSession::new(stylizer, config, settings).unwrap()
}

/// Stream A's input k; stream B reads the clip backwards.
fn input(stream: usize, k: usize) -> usize {
    if stream == 0 { k % 8 } else { 7 - k % 8 }
}

fn push(session: &mut VideoSession, stream: usize, k: usize) -> Tensor {
    let i = input(stream, k);
    session.push(&frame(i), Some(&control(i))).unwrap().image
}

/// A stream run alone on its own, unshared copy of the models.
fn alone(stream: usize, frames: usize) -> Vec<Tensor> {
    let spec = if stream == 0 { stream_a() } else { stream_b() };
    let mut s = session(tiny_stylizer(), spec);
    (0..frames).map(|k| push(&mut s, stream, k)).collect()
}

fn shared(instance_id: &str) -> Stylizer {
    Stylizer::load_shared(&tiny_spec(), &Device::Cpu, DType::F32, instance_id).expect("tiny model loads")
}

#[test]
fn two_sessions_share_one_load_and_give_their_own_frames() {
    let _serial = serial();
    let want_a = alone(0, FRAMES);
    let want_b = alone(1, FRAMES + 3);
    // The streams differ far more than the tolerance (zero) the comparison uses.
    assert!(max_abs_diff(&want_a[0], &want_b[0]) > 0.05);

    let loads = registry::loads();
    let mut a = session(shared(""), stream_a());
    let mut b = session(shared(""), stream_b());
    assert_eq!(registry::loads() - loads, 1, "equal settings load once");
    assert!(Arc::ptr_eq(a.stylizer().shared(), b.stylizer().shared()));

    // Interleaved frame by frame: B's first frame comes between A's, so any state of A
    // (prompt embeddings, cross-frame keys and values, noise, anchors) leaking into B shows.
    for k in 0..FRAMES {
        let got_a = push(&mut a, 0, k);
        let got_b = push(&mut b, 1, k);
        assert_eq!(max_abs_diff(&got_a, &want_a[k]), 0.0, "stream A frame {k}");
        assert_eq!(max_abs_diff(&got_b, &want_b[k]), 0.0, "stream B frame {k}");
    }
    // A stops; B goes on with the same copy.
    drop(a);
    for k in FRAMES..FRAMES + 3 {
        assert_eq!(max_abs_diff(&push(&mut b, 1, k), &want_b[k]), 0.0, "stream B frame {k} after A stopped");
    }
    assert_eq!(registry::loads() - loads, 1);

    // The last user's drop frees the copy: the next user loads it again.
    let weak = Arc::downgrade(b.stylizer().shared());
    drop(b);
    assert!(weak.upgrade().is_none(), "the registry must not keep the models alive");
    assert_eq!(registry::live_copies(), 0);
    let again = shared("");
    assert_eq!(registry::loads() - loads, 2, "a freed copy is loaded again");
    drop(again);
}

#[test]
fn sessions_on_two_threads_at_once_give_their_own_frames() {
    let _serial = serial();
    let want = [alone(0, FRAMES), alone(1, FRAMES)];
    let loads = registry::loads();
    let a = session(shared("threads"), stream_a());
    let b = session(shared("threads"), stream_b());
    assert_eq!(registry::loads() - loads, 1);
    let got: Vec<Vec<Tensor>> = std::thread::scope(|scope| {
        let handles: Vec<_> = [a, b]
            .into_iter()
            .enumerate()
            .map(|(stream, mut s)| scope.spawn(move || (0..FRAMES).map(|k| push(&mut s, stream, k)).collect()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (stream, (got, want)) in got.iter().zip(&want).enumerate() {
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(max_abs_diff(g, w), 0.0, "stream {stream} frame {k}");
        }
    }
}

#[test]
fn distinct_instance_ids_load_distinct_copies() {
    let _serial = serial();
    let loads = registry::loads();
    let first = shared("reg-a");
    let second = shared("reg-b");
    assert_eq!(registry::loads() - loads, 2, "distinct ids load twice, settings equal or not");
    assert!(!Arc::ptr_eq(first.shared(), second.shared()));
    let third = shared("reg-a");
    assert_eq!(registry::loads() - loads, 2);
    assert!(Arc::ptr_eq(first.shared(), third.shared()));
    // An id's copy is apart from the copy shared by settings (the empty id).
    let by_settings = shared("");
    assert!(!Arc::ptr_eq(first.shared(), by_settings.shared()));
    assert_eq!(registry::loads() - loads, 3);
}

#[test]
fn instance_id_asked_for_with_other_settings_is_an_error_naming_it() {
    let _serial = serial();
    let held = shared("reg-clash");
    let other = ModelSpec { controlnet: fixtures().join("other-controlnet").display().to_string(), ..tiny_spec() };
    let loads = registry::loads();
    let err = match Stylizer::load_shared(&other, &Device::Cpu, DType::F32, "reg-clash") {
        Ok(_) => panic!("an id's copy must not be shared with other settings"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("\"reg-clash\""), "{err}");
    assert!(err.contains("other-controlnet"), "the asked-for settings: {err}");
    assert!(err.contains("tiny-controlnet"), "the loaded settings: {err}");
    assert_eq!(registry::loads(), loads, "nothing is loaded for a clash");
    // Another dtype is other settings too.
    let err = format!(
        "{:#}",
        Stylizer::load_shared(&tiny_spec(), &Device::Cpu, DType::F16, "reg-clash").err().expect("a clash")
    );
    assert!(err.contains("\"reg-clash\"") && err.contains("(f16)") && err.contains("(f32)"), "{err}");
    // Once the holder is gone the id is free for other settings.
    drop(held);
    let err = format!(
        "{:#}",
        Stylizer::load_shared(&other, &Device::Cpu, DType::F32, "reg-clash").err().expect("no such ControlNet")
    );
    assert!(!err.contains("already used"), "{err}");
}
