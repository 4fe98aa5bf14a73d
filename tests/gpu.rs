//! GPU against CPU on the tiny model: a 4-frame cross-frame session (first+prev, fixed
//! noise) in f32 on CUDA must match the CPU within the parity tolerance; f16 and bf16 are
//! reported and bounded. Opt-in: needs a CUDA build and a GPU.
//!
//!   cargo test --release --features cuda --test gpu -- --nocapture
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use sdcrossframe::cross_frame::{AttentionMode, AttentionScope, StoreLocation};
use sdcrossframe::ops::step_graphs::{GraphOwner, StepGraphs, StepKey};
use sdcrossframe::pipeline::Stylizer;
use sdcrossframe::session::{SessionConfig, VideoSession};

const FRAMES: usize = 4;

fn run_session(device: &Device, dtype: DType) -> Vec<Tensor> {
    run_session_with(&tiny_spec(), device, dtype)
}

fn run_session_with(spec: &sdcrossframe::pipeline::ModelSpec, device: &Device, dtype: DType) -> Vec<Tensor> {
    run_session_stored(spec, device, dtype, StoreLocation::Device)
}

fn run_session_stored(
    spec: &sdcrossframe::pipeline::ModelSpec,
    device: &Device,
    dtype: DType,
    store: StoreLocation,
) -> Vec<Tensor> {
    let stylizer = Stylizer::load(spec, device, dtype).expect("tiny model loads");
    let config = SessionConfig {
        attention: AttentionMode::FirstPrev,
        scope: AttentionScope::Up,
        store,
        size: fixture_size(),
        ..SessionConfig::default()
    };
    let mut session = VideoSession::new(stylizer, config, base_settings()).unwrap();
    session.set_noise(Some(fixture_noise().to_device(device).unwrap()));
    let images = (0..FRAMES)
        .map(|k| {
            let image = session.push(&frame(k), Some(&control(k))).unwrap().image;
            image.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap()
        })
        .collect();
    if device.is_cuda() && StepGraphs::enabled_for(device) {
        // Frame 1 is the anchor and frame 2 the first follower (eager); frame 3 captures its
        // steps, frame 4 replays them: the comparison covers replayed CUDA graphs.
        let (stats, error) = session.stylizer().img2img().graph_stats();
        println!("{dtype:?} denoising steps: {stats:?}");
        assert!(
            stats.captured > 0 && stats.replayed > 0 && stats.failed == 0,
            "{dtype:?}: steps did not run from CUDA graphs: {stats:?}, capture error: {error:?}"
        );
        // The VAE and the control embedding: eager on frame 1, captured on frame 2, replayed after.
        let stages = session.stylizer().img2img().stage_graph_stats();
        println!("{dtype:?} encode / control / decode stages: {stages:?}");
        assert!(
            stages.captured == 3 && stages.replayed == 3 * (FRAMES - 2) && stages.failed == 0,
            "{dtype:?}: stages did not run from CUDA graphs: {stages:?}"
        );
    }
    images
}

fn differences(got: &[Tensor], want: &[Tensor]) -> (f32, f32) {
    let max = got.iter().zip(want).map(|(g, w)| max_abs_diff(g, w)).fold(0f32, f32::max);
    let mean = got.iter().zip(want).map(|(g, w)| mean_abs_diff(g, w)).sum::<f32>() / got.len() as f32;
    (max, mean)
}

#[test]
fn gpu_matches_cpu_in_f32_and_stays_close_in_half_precision() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let cpu = run_session(&Device::Cpu, DType::F32);
    let (max, mean) = differences(&run_session(&gpu, DType::F32), &cpu);
    println!("cuda f32 vs cpu f32 over {FRAMES} frames: max abs {max:.2e}, mean abs {mean:.2e}");
    let mut bad = Vec::new();
    if max > IMAGE_TOLERANCE {
        bad.push(format!("f32 max {max:.2e} > {IMAGE_TOLERANCE}"));
    }
    for dtype in [DType::F16, DType::BF16] {
        let (max, mean) = differences(&run_session(&gpu, dtype), &cpu);
        println!("cuda {dtype:?} vs cpu f32 over {FRAMES} frames: max abs {max:.2e}, mean abs {mean:.2e}");
        // Pixels are in [0, 1]: half precision may move single pixels a little, never the picture.
        let (max_bound, mean_bound) = if dtype == DType::F16 { (0.1, 0.01) } else { (0.2, 0.03) };
        if max > max_bound || mean > mean_bound {
            bad.push(format!("{dtype:?}: max {max:.2e} (bound {max_bound}), mean {mean:.2e} (bound {mean_bound})"));
        }
    }
    assert!(bad.is_empty(), "{bad:?}");
}

/// The same with the tiny VAE (TAESD) in f32: its graphs replay the same result as the CPU.
#[test]
fn gpu_matches_cpu_with_the_tiny_vae() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let spec = sdcrossframe::pipeline::ModelSpec {
        vae: Some(fixtures().join("tiny-taesd").display().to_string()),
        ..tiny_spec()
    };
    let cpu = run_session_with(&spec, &Device::Cpu, DType::F32);
    let (max, mean) = differences(&run_session_with(&spec, &gpu, DType::F32), &cpu);
    println!("tiny VAE: cuda f32 vs cpu f32 over {FRAMES} frames: max abs {max:.2e}, mean abs {mean:.2e}");
    assert!(max < 1e-3, "tiny VAE: cuda f32 differs from the CPU by {max:.2e}");
}

/// Two streams through one shared model on CUDA, each on its own thread (the threads queue on
/// their own streams): with `batch_timeout` their denoising calls meet in one UNet call.
/// Returns each stream's frames alone (one after the other) and together, and the shared
/// calls of each stream.
fn two_streams_on_threads(
    batch_timeout: Option<sdcrossframe::pipeline::BatchTimeout>,
) -> (Vec<Vec<Tensor>>, Vec<(Vec<Tensor>, u64)>, Stylizer) {
    two_streams_stored(batch_timeout, StoreLocation::Device)
}

fn two_streams_stored(
    batch_timeout: Option<sdcrossframe::pipeline::BatchTimeout>,
    store: StoreLocation,
) -> (Vec<Vec<Tensor>>, Vec<(Vec<Tensor>, u64)>, Stylizer) {
    use sdcrossframe::pipeline::FrameSettings;
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let frames = 6;
    let config = SessionConfig {
        attention: AttentionMode::FirstPrev,
        scope: AttentionScope::Up,
        store,
        size: fixture_size(),
        ..SessionConfig::default()
    };
    // DDIM, 3 of 6 steps, with the guidance batch: 2 rows per stream, 4 per shared call.
    let settings = |prompt: &str| FrameSettings { prompt: prompt.into(), steps: 6, strength: 0.5, ..base_settings() };
    let prompts = ["a watercolor painting", "a charcoal drawing of a city"];
    let run = |mut session: VideoSession, gpu: &Device| -> Vec<Tensor> {
        session.set_noise(Some(fixture_noise().to_device(gpu).unwrap()));
        (0..frames)
            .map(|k| session.push(&frame(k), Some(&control(k))).unwrap().image.to_device(&Device::Cpu).unwrap())
            .collect()
    };
    let stylizer = Stylizer::load_shared(&tiny_spec(), &gpu, DType::F32, "").expect("tiny model loads");
    let alone: Vec<Vec<Tensor>> = prompts
        .iter()
        .map(|p| run(VideoSession::new(stylizer.share(), config.clone(), settings(p)).unwrap(), &gpu))
        .collect();
    let together_config = SessionConfig { batch_timeout, ..config.clone() };
    let sessions: Vec<VideoSession> = prompts
        .iter()
        .map(|p| VideoSession::new(stylizer.share(), together_config.clone(), settings(p)).unwrap())
        .collect();
    let start = std::sync::Barrier::new(sessions.len());
    let together = std::thread::scope(|scope| {
        let handles: Vec<_> = sessions
            .into_iter()
            .map(|session| {
                let (start, gpu, run) = (&start, &gpu, &run);
                scope.spawn(move || {
                    start.wait();
                    let shared = std::cell::Cell::new(0);
                    let images = {
                        let mut session = session;
                        session.set_noise(Some(fixture_noise().to_device(gpu).unwrap()));
                        let images: Vec<Tensor> = (0..frames)
                            .map(|k| {
                                session
                                    .push(&frame(k), Some(&control(k)))
                                    .unwrap()
                                    .image
                                    .to_device(&Device::Cpu)
                                    .unwrap()
                            })
                            .collect();
                        shared.set(session.shared_calls());
                        let _ = run;
                        images
                    };
                    (images, shared.get())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (alone, together, stylizer)
}

/// Each stream's frames against the same stream alone, frame by frame (printed); the largest.
fn per_frame_check(label: &str, alone: &[Vec<Tensor>], together: &[(Vec<Tensor>, u64)]) -> f32 {
    let mut worst = 0f32;
    for (i, ((images, shared), want)) in together.iter().zip(alone).enumerate() {
        let diffs: Vec<String> = images.iter().zip(want).map(|(g, w)| format!("{:.1e}", max_abs_diff(g, w))).collect();
        println!("{label} stream {i} (shared calls {shared}): per frame max abs vs alone {diffs:?}");
        worst = worst.max(differences(images, want).0);
    }
    worst
}

/// A shared model used from two threads at once without batching: each stream's frames are
/// those it gets alone (the stage graphs and step graphs are shared between the threads).
#[test]
fn a_model_shared_by_two_threads_gives_each_stream_its_own_frames() {
    let (alone, together, _) = two_streams_on_threads(None);
    let worst = per_frame_check("shared model, no batching:", &alone, &together);
    assert!(worst < 1e-4, "a stream on a shared model differs from alone by {worst:.2e}");
}

/// Cross-stream batching on CUDA (issue 17): two sessions sharing one model on their own
/// threads meet before every denoising call; the shared calls must run from CUDA graphs once
/// warm (a round is led by whichever stream arrives first, so each thread warms candle's
/// per-thread upload cache before it captures), and each stream must get what it gets alone.
#[test]
fn cross_stream_calls_run_from_cuda_graphs() {
    check_cross_stream_calls("cross-stream", StoreLocation::Device);
}

/// Two streams batched with their stores at `store`: each gets what it gets alone, every
/// stream shared calls, and (graphs on) the shared calls were captured and replayed.
fn check_cross_stream_calls(label: &str, store: StoreLocation) {
    let timeout = sdcrossframe::pipeline::BatchTimeout::Fixed(std::time::Duration::from_secs(20));
    let (alone, together, stylizer) = two_streams_stored(Some(timeout), store);
    let (stats, error) = stylizer.img2img().cross_stream_graph_stats();
    println!("{label} calls: {stats:?}");
    let worst = per_frame_check(&format!("{label}:"), &alone, &together);
    assert!(together.iter().all(|t| t.1 > 0), "{label}: a stream shared no call");
    assert!(worst < 1e-4, "{label}: batched differs from alone by {worst:.2e}");
    if StepGraphs::enabled_for(stylizer.device()) {
        assert!(
            stats.captured > 0 && stats.replayed > 0 && stats.failed == 0,
            "{label}: calls did not run from CUDA graphs: {stats:?}, capture error: {error:?}"
        );
    }
}

/// A step that runs eagerly among captured ones (a stream batch draining at the end of a
/// stream, a new composition of streams) first gives the idle graphs' memory back, so that the
/// two do not add up; the graph maps memory again at its next launch and computes the same.
#[test]
fn an_eager_step_among_captured_ones_runs_with_the_graphs_memory_given_back() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let input = Tensor::arange(0f32, (1 << 20) as f32, &gpu).unwrap().reshape((1024, 1024)).unwrap();
    // 64 MiB of temporaries: graph memory once captured.
    let step = |t: &[Tensor]| -> candle_core::Result<Tensor> {
        let wide = t[0].repeat((16, 1))?;
        wide.narrow(0, 1024, 1024)? * 2.0
    };
    let key = |hook| StepKey { index: 0, timestep: 1, controlnet_scale_bits: 0, hook };
    let expected = (&input * 2.0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let check = |out: Tensor, what: &str| {
        assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected, "{what}");
    };
    let mut graphs = StepGraphs::default();
    for run in ["eager", "captured", "replayed"] {
        check(graphs.run(&gpu, key(Some(7)), Vec::new(), &[&input], step).unwrap(), run);
    }
    let stats = graphs.stats();
    assert_eq!((stats.captured, stats.replayed), (1, 1), "{stats:?}");
    gpu.synchronize().unwrap();
    let held = sdcrossframe::gpu_memory::graph_memory(&gpu).expect("graph memory readable").used;
    assert!(held >= 64 << 20, "the captured step holds {held} bytes of graph memory");
    // Not replayable (a draining stream batch): eager, after the graphs' memory went back.
    check(graphs.run(&gpu, key(None), Vec::new(), &[&input], step).unwrap(), "eager among captured");
    let after = sdcrossframe::gpu_memory::graph_memory(&gpu).expect("graph memory readable").used;
    println!("graph memory before the eager step {held} bytes, after {after}");
    assert!(after + (64 << 20) <= held, "the eager step ran beside {after} bytes of graph memory (before {held})");
    check(graphs.run(&gpu, key(Some(7)), Vec::new(), &[&input], step).unwrap(), "replayed after the memory went back");
    assert_eq!(graphs.stats().replayed, 2);
}

/// Threads sharing step graphs (elements sharing a model without batching, each on its own
/// thread and stream): each captures on buffers of its own and replays them without waiting
/// for the others, and a step captured on one thread replays right on another.
#[test]
fn threads_replay_their_captured_steps_on_buffers_of_their_own() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let graphs = std::sync::Mutex::new(StepGraphs::default());
    let key = |hook| StepKey { index: 0, timestep: 1, controlnet_scale_bits: 0, hook };
    // Enough work per step that unordered copies would show.
    let step = |t: &[Tensor]| -> candle_core::Result<Tensor> {
        let mut x = t[0].clone();
        for _ in 0..8 {
            x = (x.matmul(&t[0])? / 256.0)?;
        }
        Ok(x)
    };
    let input = |seed: f32| (Tensor::rand(0f32, 1.0, (256, 256), &gpu).unwrap() + seed as f64 * 1e-3).unwrap();
    let run =
        |hook: u64, x: &Tensor| graphs.lock().unwrap().run(&gpu, key(Some(hook)), Vec::new(), &[x], step).unwrap();
    std::thread::scope(|scope| {
        for thread in 0..2u64 {
            let (run, input, step) = (&run, &input, &step);
            scope.spawn(move || {
                for i in 0..12 {
                    let x = input((thread * 100 + i) as f32);
                    let expected = step(&[x.clone()]).unwrap();
                    let out = run(thread, &x);
                    let diff = (out - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(diff < 1e-6, "thread {thread}, run {i}: {diff}");
                }
            });
        }
    });
    let holdings = graphs.lock().unwrap().holdings();
    assert_eq!(holdings.graphs, 2);
    // Two threads' sets of one signature's buffers.
    assert_eq!(holdings.buffer_bytes, 2 * 2 * 256 * 256 * 4, "{holdings:?}");
    // Thread 0's step, replayed on a third thread.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let x = input(7.0);
            let expected = step(&[x.clone()]).unwrap();
            let diff = (run(0, &x) - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "replayed on another thread: {diff}");
        });
    });
    let stats = graphs.lock().unwrap().stats();
    assert_eq!((stats.captured, stats.replayed), (2, 21), "{stats:?}");
}

/// A captured step whose owner (a cross-frame store's buffers) is gone is dropped at the step
/// graphs' next use, its graph with it; one whose owner lives stays and replays.
#[test]
fn captured_steps_of_an_owner_that_is_gone_are_dropped() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let input = Tensor::arange(0f32, 1024f32, &gpu).unwrap();
    let step = |t: &[Tensor]| -> candle_core::Result<Tensor> { t[0].clone() * 3.0 };
    let key = |hook| StepKey { index: 0, timestep: 1, controlnet_scale_bits: 0, hook };
    let (kept, dropped) = (GraphOwner::default(), GraphOwner::default());
    let mut graphs = StepGraphs::default();
    for _ in 0..2 {
        graphs.run(&gpu, key(Some(1)), vec![kept.watch()], &[&input], step).unwrap();
        graphs.run(&gpu, key(Some(2)), vec![kept.watch(), dropped.watch()], &[&input], step).unwrap();
    }
    assert_eq!(graphs.holdings().graphs, 2);
    drop(dropped);
    // The next run (here a replay of the kept key) drops the graph of the owner that is gone.
    let expected = (&input * 3.0).unwrap().to_vec1::<f32>().unwrap();
    let out = graphs.run(&gpu, key(Some(1)), vec![kept.watch()], &[&input], step).unwrap();
    assert_eq!(out.to_vec1::<f32>().unwrap(), expected);
    assert_eq!(graphs.holdings().graphs, 1, "the graph of the owner that is gone is dropped");
    let out = graphs.run(&gpu, key(Some(1)), vec![kept.watch()], &[&input], step).unwrap();
    assert_eq!(out.to_vec1::<f32>().unwrap(), expected);
    let stats = graphs.stats();
    assert_eq!((stats.captured, stats.replayed), (2, 2), "{stats:?}");
}

/// The cross-frame store on the host (`ops::offload`): its copies run on a stream of their own
/// and are captured into the step graphs beside the kernels; the frames are those of the store
/// on the device, with the steps captured and replayed (checked in `run_session_stored`), in
/// f32 and f16.
#[test]
fn the_store_on_the_host_gives_the_frames_of_the_store_on_the_device() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    for dtype in [DType::F32, DType::F16] {
        let on_device = run_session_stored(&tiny_spec(), &gpu, dtype, StoreLocation::Device);
        let on_host = run_session_stored(&tiny_spec(), &gpu, dtype, StoreLocation::Host);
        let (max, _) = differences(&on_host, &on_device);
        println!("{dtype:?}: store on the host vs on the device over {FRAMES} frames: max abs {max:.2e}");
        assert!(max < 1e-6, "{dtype:?}: the host store changed the frames by {max:.2e}");
    }
}

/// Cross-stream calls with the stores on the host: every stream's copies are forked from and
/// joined to the call's stream, captured once warm; each stream gets what it gets alone.
#[test]
fn cross_stream_calls_with_the_stores_on_the_host() {
    check_cross_stream_calls("cross-stream, host stores", StoreLocation::Host);
}

/// The VAE on its own CUDA stream (`ops::vae_stream`): the element's order (prepare N+1,
/// launch N+1, finish N) with it gives the frames `push` gives with it off, in f32, with the
/// same kernels; and a session that is its models' only user takes that order.
#[test]
fn the_vae_stream_gives_the_frames_of_one_stream() {
    let gpu = Device::new_cuda(0).expect("a CUDA device");
    let stylizer = Stylizer::load(&tiny_spec(), &gpu, DType::F32).expect("tiny model loads");
    let config = SessionConfig {
        attention: AttentionMode::FirstPrev,
        scope: AttentionScope::Up,
        size: fixture_size(),
        ..SessionConfig::default()
    };
    let frames = 6;
    let mut one_stream = VideoSession::new(stylizer.share(), config.clone(), base_settings()).unwrap();
    one_stream.set_vae_stream(false);
    one_stream.set_noise(Some(fixture_noise().to_device(&gpu).unwrap()));
    assert!(!one_stream.launches_before_finishing());
    let want: Vec<Tensor> = (0..frames)
        .map(|k| one_stream.push(&frame(k), Some(&control(k))).unwrap().image.to_device(&Device::Cpu).unwrap())
        .collect();
    drop(one_stream);
    let mut session = VideoSession::new(stylizer, config, base_settings()).unwrap();
    session.set_noise(Some(fixture_noise().to_device(&gpu).unwrap()));
    if !session.launches_before_finishing() {
        println!("no VAE stream (SDCROSSFRAME_VAE_STREAM=off): nothing to compare");
        return;
    }
    let mut got = Vec::new();
    let mut in_flight = None;
    for k in 0..frames {
        let prepared = session.prepare(&frame(k), Some(&control(k))).unwrap();
        let launched = session.launch(prepared).unwrap();
        if let Some(previous) = in_flight.replace(launched) {
            got.push(session.finish(previous).unwrap());
        }
    }
    got.push(session.finish(in_flight.unwrap()).unwrap());
    let images: Vec<Tensor> = got.iter().map(|f| f.stylized.image.to_device(&Device::Cpu).unwrap()).collect();
    let (max, _) = differences(&images, &want);
    println!("VAE stream vs one stream over {frames} frames: max abs {max:.2e}");
    assert!(max < 1e-6, "the VAE stream changes the frames by {max:.2e}");
}
