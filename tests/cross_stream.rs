//! Cross-stream batching (issue 17): sessions sharing one loaded model, each on its own
//! thread, meet before every denoising call, and calls that share a step plan run as one UNet
//! call. Each stream must get exactly the frames it gets alone (within 1e-5 per pixel) for
//! different prompts, sizes, attention modes, with the stream batch on in one stream only, a
//! scene cut in one stream only and a settings change in one stream; the calls must really be
//! shared where the plans match and never where they differ; the model is loaded once; a stream
//! that stops leaves the others running.

mod common;

use std::sync::{Barrier, Mutex, MutexGuard};
use std::time::Duration;

use candle_core::{DType, Device};
use common::*;
use sdcrossframe::cross_frame::{AttentionMode, AttentionScope, StoreLocation};
use sdcrossframe::frame::RgbFrame;
use sdcrossframe::ops::step_graphs::GraphStats;
use sdcrossframe::pipeline::{BatchTimeout, FrameSettings, SizeRequest, Stylizer, registry};
use sdcrossframe::session::{SessionConfig, StylizedFrame, VideoSession};

/// Each stream against itself alone, per pixel in [0, 1] (the bound).
const TOLERANCE: f32 = 1e-5;
/// DDIM over 6 steps at strength 0.5 ([`Stream::new`]): 3 denoising steps.
const DENOISING_STEPS: usize = 3;
/// Long enough that on a loaded machine streams still meet every round; a stream that stops
/// leaves the batcher, so nobody waits for it.
const PATIENT: BatchTimeout = BatchTimeout::Fixed(Duration::from_secs(20));

/// The load counter is process-wide: the tests of this file take turns.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// One stream: what it runs and the frames it is fed.
#[derive(Clone)]
struct Stream {
    config: SessionConfig,
    settings: FrameSettings,
    frames: Vec<RgbFrame>,
    /// Settings used from a frame on: `(frame, settings)`.
    changes: Vec<(usize, FrameSettings)>,
}

impl Stream {
    fn new(mode: AttentionMode, prompt: &str, stream_batch: bool) -> Self {
        let config = SessionConfig {
            attention: mode,
            scope: AttentionScope::Up,
            scene_cut_threshold: 0.2,
            size: fixture_size(),
            stream_batch,
            ..SessionConfig::default()
        };
        // DDIM over 6 steps at strength 0.5: the last 3, with the guidance batch.
        let settings = FrameSettings { prompt: prompt.into(), steps: 6, strength: 0.5, ..base_settings() };
        Self { config, settings, frames: (0..6).map(frame).collect(), changes: Vec::new() }
    }

    /// The fixture frames' negatives from `at` on: a cut the luma measure sees.
    fn with_scene_cut(mut self, at: usize) -> Self {
        for f in &mut self.frames[at..] {
            f.data.iter_mut().for_each(|v| *v = 255 - *v);
        }
        self
    }

    /// The cross-frame store kept on the host.
    fn on_host(mut self) -> Self {
        self.config.store = StoreLocation::Host;
        self
    }

    fn settings_at(&self, k: usize) -> FrameSettings {
        self.changes.iter().rev().find(|(from, _)| k >= *from).map_or(self.settings.clone(), |(_, s)| s.clone())
    }
}

/// What a stream's run gave: its frames, and per frame the calls shared with other streams.
struct Run {
    frames: Vec<StylizedFrame>,
    shared_per_frame: Vec<u64>,
    /// The cross-frame store at the end: its entries' bytes, and the memory its buffers keep.
    store_bytes: usize,
    store_held_bytes: usize,
    /// The shared model's step counts when this stream ended (one frame, stream batch,
    /// cross-stream), and the report line the element logs.
    graph_stats: [GraphStats; 3],
    graph_report: String,
}

fn session(stylizer: Stylizer, stream: &Stream, batch_timeout: Option<BatchTimeout>) -> VideoSession {
    let config = SessionConfig { batch_timeout, ..stream.config.clone() };
    VideoSession::new(stylizer, config, stream.settings.clone()).unwrap()
}

/// Feeds the stream's frames; the session is dropped at the end (it stops).
fn run(mut session: VideoSession, stream: &Stream) -> Run {
    let mut frames = Vec::new();
    let mut shared_per_frame = Vec::new();
    for (k, input) in stream.frames.iter().enumerate() {
        let settings = stream.settings_at(k);
        if *session.settings() != settings {
            session.set_settings(settings).unwrap();
        }
        let before = session.shared_calls();
        if stream.config.stream_batch {
            frames.extend(session.push_stream(input, None).unwrap());
        } else {
            frames.push(session.push(input, None).unwrap());
        }
        shared_per_frame.push(session.shared_calls() - before);
    }
    frames.extend(session.drain_stylized().unwrap());
    let store_bytes = session.attention().stored_bytes();
    let store_held_bytes = session.attention().held_bytes();
    let (graph_stats, graph_report) = (session.step_graph_stats(), session.graph_report());
    Run { frames, shared_per_frame, store_bytes, store_held_bytes, graph_stats, graph_report }
}

/// Runs the streams on threads of their own through one shared copy of the models (loaded
/// once), and each alone; checks each stream against itself alone. Returns the shared runs.
fn check(label: &str, streams: &[Stream]) -> Vec<Run> {
    check_with_call_limit(label, streams, Some(sdcrossframe::pipeline::DEFAULT_MAX_CALL_PIXELS))
}

/// [`check`] with the batcher's limit on latent pixels per UNet call.
fn check_with_call_limit(label: &str, streams: &[Stream], max_call_pixels: Option<usize>) -> Vec<Run> {
    let _serial = serial();
    let loads = registry::loads();
    let stylizers: Vec<Stylizer> =
        streams.iter().map(|_| Stylizer::load_shared(&tiny_spec(), &Device::Cpu, DType::F32, "").unwrap()).collect();
    assert_eq!(registry::loads() - loads, 1, "{label}: the streams' model is loaded once");
    let batcher = stylizers[0].shared().batcher();
    assert_eq!(batcher.max_call_pixels(), Some(sdcrossframe::pipeline::DEFAULT_MAX_CALL_PIXELS), "the default limit");
    batcher.set_max_call_pixels(max_call_pixels);
    let alone: Vec<Run> = streams.iter().zip(&stylizers).map(|(s, st)| run(session(st.share(), s, None), s)).collect();
    // Every session exists before any frame goes in, so that the streams meet from the first call.
    let sessions: Vec<VideoSession> =
        streams.iter().zip(stylizers).map(|(s, st)| session(st, s, Some(PATIENT))).collect();
    let start = Barrier::new(streams.len());
    let together: Vec<Run> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .iter()
            .zip(sessions)
            .map(|(stream, session)| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    run(session, stream)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (got, want)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(got.frames.len(), streams[i].frames.len(), "{label} stream {i}: every frame comes out once");
        let mut worst = 0f32;
        for (k, (g, w)) in got.frames.iter().zip(&want.frames).enumerate() {
            assert_eq!((g.index, g.anchor, g.anchor_reason), (w.index, w.anchor, w.anchor_reason), "{label} {i}/{k}");
            let err = max_abs_diff(&g.image, &w.image);
            worst = worst.max(err);
            assert!(err <= TOLERANCE, "{label} stream {i} frame {k}: {err:.2e} from the stream alone");
        }
        println!(
            "{label} stream {i}: largest difference from the stream alone {worst:.2e}, shared calls per frame {:?}, \
             store {} bytes holding {} (alone: {} holding {})",
            got.shared_per_frame, got.store_bytes, got.store_held_bytes, want.store_bytes, want.store_held_bytes
        );
        // The store keeps its own rows only: an entry recorded in a call of several frames or
        // streams must not keep the whole call's activations alive (issue 17's memory). On
        // the host, the device holds the staging buffers of one call: one step's entries, or
        // every step's with the stream batch (its calls hold a frame at each step).
        assert_eq!(got.store_bytes, want.store_bytes, "{label} stream {i}: the same entries as alone");
        let config = &streams[i].config;
        let held = match (config.store, config.stream_batch) {
            (StoreLocation::Host, false) => got.store_bytes / DENOISING_STEPS,
            _ => got.store_bytes,
        };
        assert_eq!(got.store_held_bytes, held, "{label} stream {i}: the store holds only its entries");
        assert_eq!(want.store_held_bytes, held, "{label} stream {i} alone: the store holds only its entries");
    }
    together
}

#[test]
fn two_streams_share_calls_and_give_what_each_gives_alone() {
    let a = Stream::new(AttentionMode::FirstPrev, "a watercolor painting", false).with_scene_cut(3);
    let b = Stream::new(AttentionMode::Prev, "a charcoal drawing of a city", false);
    let runs = check("first+prev with a cut / prev", &[a, b]);
    // Same plan, in lockstep: every call of both is shared.
    for run in &runs {
        assert!(run.shared_per_frame.iter().all(|&n| n == 3), "shared calls per frame {:?}", run.shared_per_frame);
    }
    // The model's counts (what the element logs at stop): the runs alone made one-frame calls
    // only, 3 per frame; together every call was one cross-stream call for both streams. On
    // the CPU every call runs eagerly. The stream that ended last saw the final counts.
    let last = runs.iter().max_by_key(|r| r.graph_stats[2].eager).unwrap();
    let frames: usize = runs.iter().map(|r| r.frames.len()).sum();
    let shared: u64 = runs[0].shared_per_frame.iter().sum();
    assert_eq!(last.graph_stats[0], GraphStats { eager: frames * DENOISING_STEPS, ..Default::default() });
    assert_eq!(last.graph_stats[1], GraphStats::default(), "no stream batch here");
    assert_eq!(last.graph_stats[2], GraphStats { eager: shared as usize, ..Default::default() });
    let expected =
        format!("one frame {}/0/0/0, stream batch 0/0/0/0, cross-stream {shared}/0/0/0", frames * DENOISING_STEPS);
    assert!(last.graph_report.contains(&expected), "{}", last.graph_report);
}

/// A round whose calls would hold more latent pixels than the batcher's limit runs as several
/// calls of whole streams (on a GPU, 4 live streams' 16-row calls as two of 8 rows: less
/// memory at the same rate); each stream still gets what it gets alone.
#[test]
fn a_round_over_the_call_limit_runs_as_calls_of_whole_streams() {
    let streams: Vec<Stream> = ["a watercolor painting", "an oil painting", "a pencil sketch"]
        .iter()
        .map(|prompt| Stream::new(AttentionMode::FirstPrev, prompt, false))
        .collect();
    // 96x64 frames: 12x8 latent pixels a row, 2 rows a stream (the guidance batch); room for
    // two streams per call. Members in order: the first two share, the third runs alone.
    let runs = check_with_call_limit("a call limit of two streams", &streams, Some(2 * 2 * 12 * 8));
    let shared: Vec<u64> = runs.iter().map(|r| r.shared_per_frame.iter().sum()).collect();
    let calls = (streams[0].frames.len() * DENOISING_STEPS) as u64;
    assert_eq!(shared, [calls, calls, 0], "shared calls per stream");
    // One cross-stream call per round (the pair), one one-frame call (the third stream).
    let last = runs.iter().max_by_key(|r| r.graph_stats[2].eager).unwrap();
    assert_eq!(last.graph_stats[2].eager, calls as usize, "{}", last.graph_report);
    // Without the limit the three share every call.
    let runs = check_with_call_limit("no call limit", &streams, None);
    assert!(runs.iter().all(|r| r.shared_per_frame.iter().sum::<u64>() == calls));
}

#[test]
fn three_streams_with_stream_batch_attention_off_and_another_size() {
    let a = Stream::new(AttentionMode::FirstPrev, "a watercolor painting", true);
    let b = Stream::new(AttentionMode::Off, "an oil painting", false).with_scene_cut(2);
    let mut c = Stream::new(AttentionMode::First, "a pencil sketch", false);
    c.config.size = SizeRequest::exact(64, 48);
    let runs = check("stream batch / off / another size", &[a, b, c]);
    assert!(
        runs[0].shared_per_frame.iter().sum::<u64>() > 0,
        "the stream batch shares calls with the sequential stream"
    );
    assert!(runs[1].shared_per_frame.iter().sum::<u64>() > 0);
    assert_eq!(runs[2].shared_per_frame.iter().sum::<u64>(), 0, "another size never shares a call");
}

#[test]
fn a_stream_that_changes_its_settings_leaves_the_batch_and_rejoins() {
    let a = Stream::new(AttentionMode::FirstPrev, "a watercolor painting", false);
    let mut b = Stream::new(AttentionMode::FirstPrev, "a charcoal drawing", false);
    // Frames 2 and 3 run 2 steps (another plan), then the plan matches again.
    b.changes = vec![(2, FrameSettings { strength: 2.0 / 6.0, ..b.settings.clone() }), (4, b.settings.clone())];
    // b stops after 5 frames: a goes on alone.
    b.frames.truncate(5);
    let runs = check("settings change, then stop", &[a, b]);
    let b = &runs[1].shared_per_frame;
    assert_eq!(&b[2..4], &[0, 0], "another plan shares no call: {b:?}");
    assert!(b[4] > 0, "the same plan again shares calls: {b:?}");
    assert_eq!(runs[0].shared_per_frame[5], 0, "after b stopped, a runs alone");
}

/// Streams keeping their stores on the host (sequential, with a scene cut; with the stream
/// batch) beside one keeping it on the device: each gives what it gives alone, and exactly what
/// it gives with its store on the device.
#[test]
fn streams_with_their_stores_on_the_host_give_what_they_give_on_the_device() {
    let a = Stream::new(AttentionMode::FirstPrev, "a watercolor painting", false).with_scene_cut(3);
    let b = Stream::new(AttentionMode::FirstPrev, "an oil painting", true);
    let c = Stream::new(AttentionMode::Prev, "a charcoal drawing of a city", false);
    let runs = check("host stores / device store", &[a.clone().on_host(), b.clone().on_host(), c]);
    assert!(runs[0].shared_per_frame.iter().sum::<u64>() > 0, "host stores share calls");
    let _serial = serial();
    for (i, stream) in [a, b].iter().enumerate() {
        let stylizer = Stylizer::load_shared(&tiny_spec(), &Device::Cpu, DType::F32, "").unwrap();
        let on_device = run(session(stylizer.share(), stream, None), stream);
        let on_host = run(session(stylizer, &stream.clone().on_host(), None), stream);
        assert_eq!(on_host.frames.len(), on_device.frames.len());
        for (k, (h, d)) in on_host.frames.iter().zip(&on_device.frames).enumerate() {
            assert_eq!(max_abs_diff(&h.image, &d.image), 0.0, "stream {i} frame {k}: the host store changes nothing");
            assert!(max_abs_diff(&runs[i].frames[k].image, &d.image) <= TOLERANCE, "stream {i} frame {k} batched");
        }
    }
}

/// A stream out of step with another (its first frame runs a shorter plan, so its second
/// frame starts while the other is inside one) waits once at that frame's start, then both run
/// in step: the other's first frame shares no call (out of step, its rows would have shared
/// calls at other steps), every later frame shares all its calls, and each stream still gets
/// what it gets alone.
#[test]
fn a_stream_out_of_step_waits_once_and_runs_in_step() {
    let a = Stream::new(AttentionMode::FirstPrev, "a watercolor painting", false);
    let mut b = Stream::new(AttentionMode::FirstPrev, "a charcoal drawing of a city", false);
    // Frame 0 of b: 1 denoising step (another plan), then a's plan.
    b.changes = vec![(1, b.settings.clone())];
    b.settings = FrameSettings { strength: 1.0 / 6.0, ..b.settings.clone() };
    let runs = check("out of step", &[a, b]);
    assert_eq!(runs[0].shared_per_frame, [0, 3, 3, 3, 3, 3], "a: in step after b's first frame");
    assert_eq!(runs[1].shared_per_frame, [0, 3, 3, 3, 3, 3], "b: in step from its second frame");
}

#[test]
fn the_batcher_forgets_a_stream_that_stops() {
    let _serial = serial();
    let stylizer = Stylizer::load_shared(&tiny_spec(), &Device::Cpu, DType::F32, "").unwrap();
    let batcher = stylizer.shared().batcher().clone();
    let members = batcher.members();
    let stream = Stream::new(AttentionMode::FirstPrev, "a watercolor painting", false);
    let config = SessionConfig { batch_timeout: Some(PATIENT), ..stream.config.clone() };
    let session = VideoSession::new(stylizer.share(), config.clone(), stream.settings.clone()).unwrap();
    assert_eq!(batcher.members(), members + 1);
    drop(session);
    assert_eq!(batcher.members(), members, "a dropped session leaves");
    let mut session = VideoSession::new(stylizer.share(), config.clone(), stream.settings.clone()).unwrap();
    session.set_config(SessionConfig { batch_timeout: None, ..config }).unwrap();
    assert_eq!(batcher.members(), members, "batching turned off leaves");
}
