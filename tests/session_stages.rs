//! The video session's staged path (prepare, launch, finish) against `push`: the same images
//! bit for bit, the same anchors, in the order an overlapping caller (the element) uses it;
//! frames prepared out of turn are refused; cancel and reset between stages.

mod common;

use common::*;
use sdcrossframe::frame::RgbFrame;
use sdcrossframe::pipeline::{Cancelled, FrameSettings};
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
