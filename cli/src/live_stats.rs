//! The runner's counting: frames in and out of the sdcrossframe element, the rolling output
//! rate, each frame's latency through the element (matched by PTS), and what was dropped.
//! Plain numbers only (times as offsets from the start of the run, PTS in nanoseconds), so
//! the arithmetic is tested without GStreamer.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// The span the rolling frame rate looks back over.
pub const FPS_WINDOW: Duration = Duration::from_secs(2);
/// Frames waiting to come out of the element that are remembered; older ones count as
/// dropped (the element holds a handful at most: one with `overlap`, N-1 with a stream
/// batch of N steps).
const MAX_PENDING: usize = 256;
/// How many dropped PTS are remembered, to tell a late (out-of-order) frame from a drop.
const RECENT_DROPS: usize = 64;

#[derive(Debug, Default)]
pub struct LiveStats {
    /// Frames that entered the element (buffers on its sink pad).
    pub frames_in: u64,
    /// Frames that left it (buffers on its src pad).
    pub frames_out: u64,
    /// Output times within the last [`FPS_WINDOW`], oldest first.
    recent_out: VecDeque<Duration>,
    first_out: Option<Duration>,
    last_out: Option<Duration>,
    /// Frames in the element: PTS (nanoseconds; `None` for buffers without one) and the
    /// time they entered, in order of entry.
    pending: VecDeque<(Option<u64>, Duration)>,
    /// PTS of frames counted as dropped, newest last.
    recent_drops: VecDeque<u64>,
    /// Frames that entered the element and never left: an output with a later PTS came
    /// first (QoS drops, frames dropped on a flush).
    pub dropped_in_element: u64,
    /// Frames that came out after a later frame (so were counted as dropped at first).
    /// The element keeps the order; a non-zero count is a bug worth reporting.
    pub out_of_order: u64,
    /// Frames that left with a PTS that never entered (none has been seen from the element).
    pub unmatched_out: u64,
    last_latency: Option<Duration>,
    total_latency: Duration,
    max_latency: Duration,
    latency_count: u32,
    /// QoS messages posted by the element (BaseTransform posts one per frame it drops as late).
    pub qos_element: u64,
    /// QoS messages posted by sinks (one per frame a sink drops as late).
    pub qos_sinks: u64,
    /// QoS messages posted by other elements, by element name: filters with QoS on (e.g.
    /// `videoconvert` before the element) drop late frames before they reach it.
    pub qos_other: BTreeMap<String, u64>,
    /// Leaky queues before the element that are watched (0: their drops are not counted).
    pub leaky_queues: usize,
    /// Overruns of those queues: each leaks (drops) the oldest queued frame.
    pub queue_overruns: u64,
    /// The pipeline's configured latency (the latency query's minimum), when live.
    pub pipeline_latency: Option<Duration>,
}

impl LiveStats {
    /// A buffer with this PTS entered the element at `at`.
    pub fn entered(&mut self, pts: Option<u64>, at: Duration) {
        self.frames_in += 1;
        self.pending.push_back((pts, at));
        while self.pending.len() > MAX_PENDING {
            let (pts, _) = self.pending.pop_front().expect("not empty");
            self.count_drop(pts);
        }
    }

    /// A buffer with this PTS left the element at `at`. The frames that entered before the
    /// one with this PTS and are still pending will not come out: they are drops.
    pub fn left(&mut self, pts: Option<u64>, at: Duration) {
        self.frames_out += 1;
        self.first_out.get_or_insert(at);
        self.last_out = Some(at);
        self.recent_out.push_back(at);
        self.forget_old_outputs(at);
        let Some(position) = self.pending.iter().position(|(p, _)| *p == pts) else {
            match pts.and_then(|p| self.recent_drops.iter().position(|d| *d == p)) {
                Some(i) => {
                    self.recent_drops.remove(i);
                    self.dropped_in_element -= 1;
                    self.out_of_order += 1;
                }
                None => self.unmatched_out += 1,
            }
            return;
        };
        for _ in 0..position {
            let (pts, _) = self.pending.pop_front().expect("position is inside");
            self.count_drop(pts);
        }
        let (_, entered) = self.pending.pop_front().expect("position is inside");
        let latency = at.saturating_sub(entered);
        self.last_latency = Some(latency);
        self.total_latency += latency;
        self.max_latency = self.max_latency.max(latency);
        self.latency_count += 1;
    }

    fn count_drop(&mut self, pts: Option<u64>) {
        self.dropped_in_element += 1;
        if let Some(pts) = pts {
            self.recent_drops.push_back(pts);
            if self.recent_drops.len() > RECENT_DROPS {
                self.recent_drops.pop_front();
            }
        }
    }

    fn forget_old_outputs(&mut self, now: Duration) {
        while self.recent_out.front().is_some_and(|t| now.saturating_sub(*t) >= FPS_WINDOW) {
            self.recent_out.pop_front();
        }
    }

    /// Frames in the element now (entered, not yet out nor counted as dropped).
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Output frames per second over the last [`FPS_WINDOW`] before `now`: the count in
    /// the window over its length once the first output is that old; before that, over the
    /// span from the first to the last output in the window (`None` with fewer than two).
    pub fn rolling_fps(&self, now: Duration) -> Option<f64> {
        let first = self.first_out?;
        let in_window: Vec<&Duration> =
            self.recent_out.iter().filter(|t| now.saturating_sub(**t) < FPS_WINDOW).collect();
        if now.saturating_sub(first) >= FPS_WINDOW {
            return Some(in_window.len() as f64 / FPS_WINDOW.as_secs_f64());
        }
        let (Some(oldest), Some(newest)) = (in_window.first(), in_window.last()) else { return None };
        let span = newest.saturating_sub(**oldest).as_secs_f64();
        (in_window.len() >= 2 && span > 0.0).then(|| (in_window.len() - 1) as f64 / span)
    }

    /// Frames per second from the first output to the last (loading time left out).
    pub fn mean_fps(&self) -> Option<f64> {
        let span = self.last_out?.saturating_sub(self.first_out?).as_secs_f64();
        (self.frames_out >= 2 && span > 0.0).then(|| (self.frames_out - 1) as f64 / span)
    }

    pub fn last_latency(&self) -> Option<Duration> {
        self.last_latency
    }

    pub fn mean_latency(&self) -> Option<Duration> {
        (self.latency_count > 0).then(|| self.total_latency / self.latency_count)
    }

    pub fn max_latency(&self) -> Option<Duration> {
        (self.latency_count > 0).then_some(self.max_latency)
    }

    /// The live display's line, kept short: rate, latency in ms (last, mean, max, the
    /// pipeline's), drops (in the element, its QoS messages, sinks' QoS messages, leaky
    /// queues' overruns).
    pub fn status(&self, now: Duration) -> String {
        let mut parts = Vec::new();
        parts.push(match self.rolling_fps(now) {
            Some(fps) => format!("{fps:.1} fps"),
            None => "-- fps".into(),
        });
        if let (Some(last), Some(mean), Some(max)) = (self.last_latency(), self.mean_latency(), self.max_latency()) {
            let mut latency = format!("latency {} ms (mean {}, max {}", ms(last), ms(mean), ms(max));
            if let Some(pipeline) = self.pipeline_latency {
                latency.push_str(&format!("; pipeline {}", ms(pipeline)));
            }
            latency.push(')');
            parts.push(latency);
        }
        let mut drops = format!(
            "dropped {} in element (QoS {}), {} sinks",
            self.dropped_in_element, self.qos_element, self.qos_sinks
        );
        if self.leaky_queues > 0 {
            drops.push_str(&format!(", {} queue", self.queue_overruns));
        }
        let other: u64 = self.qos_other.values().sum();
        if other > 0 {
            drops.push_str(&format!(", {other} other"));
        }
        if self.out_of_order > 0 {
            drops.push_str(&format!(", {} out of order", self.out_of_order));
        }
        parts.push(drops);
        parts.join("  ")
    }

    /// What was dropped where: in the element (frames in, never out; its QoS messages), by
    /// sinks (their QoS messages), by leaky queues before it (their overruns).
    fn drops(&self) -> String {
        let mut text = format!("dropped {} in sdcrossframe (QoS {})", self.dropped_in_element, self.qos_element);
        text.push_str(&format!(", {} by sinks (QoS)", self.qos_sinks));
        if self.leaky_queues > 0 {
            text.push_str(&format!(", {} by the leaky queue", self.queue_overruns));
        }
        for (name, count) in &self.qos_other {
            text.push_str(&format!(", {count} by {name} (QoS)"));
        }
        if self.out_of_order > 0 {
            text.push_str(&format!(", {} out of order", self.out_of_order));
        }
        text
    }

    /// The one-line summary at the end: frames out in the run's `elapsed` time, the mean
    /// rate from the first output on, latency mean/max, (for live pipelines, or whenever
    /// something was dropped) the drops, and the frames still in the element (a run
    /// stopped without draining it).
    pub fn summary(&self, elapsed: Duration, live: bool) -> String {
        let mut details = Vec::new();
        if let Some(fps) = self.mean_fps() {
            details.push(format!("{fps:.2} fps after the first frame"));
        }
        if let (Some(mean), Some(max)) = (self.mean_latency(), self.max_latency()) {
            let mut latency = format!("latency mean {} ms, max {} ms", ms(mean), ms(max));
            if live && let Some(pipeline) = self.pipeline_latency {
                latency.push_str(&format!(" (pipeline {} ms)", ms(pipeline)));
            }
            details.push(latency);
        }
        let anything_dropped = self.dropped_in_element + self.qos_element + self.qos_sinks + self.queue_overruns > 0
            || !self.qos_other.is_empty();
        if live || anything_dropped || self.out_of_order > 0 {
            details.push(self.drops());
        }
        if self.in_flight() > 0 {
            details.push(format!("{} still in the element", self.in_flight()));
        }
        let details = if details.is_empty() { String::new() } else { format!(" ({})", details.join("; ")) };
        format!("{} frames in {:.1} s{details}", self.frames_out, elapsed.as_secs_f64())
    }
}

/// Several elements' counts together (one process running several streams): the outputs
/// of all of them per second (the sum of each one's rate, so a stream that stalls lowers
/// it), latency over every frame of every stream, and every drop.
pub struct Totals<'a> {
    streams: Vec<&'a LiveStats>,
}

impl<'a> Totals<'a> {
    pub fn new(streams: impl IntoIterator<Item = &'a LiveStats>) -> Self {
        Self { streams: streams.into_iter().collect() }
    }

    pub fn frames_out(&self) -> u64 {
        self.streams.iter().map(|s| s.frames_out).sum()
    }

    /// The sum of the streams' rolling rates; `None` until one of them has a rate.
    pub fn rolling_fps(&self, now: Duration) -> Option<f64> {
        sum_some(self.streams.iter().map(|s| s.rolling_fps(now)))
    }

    /// The sum of the streams' mean rates (each from its first output to its last).
    pub fn mean_fps(&self) -> Option<f64> {
        sum_some(self.streams.iter().map(|s| s.mean_fps()))
    }

    /// Mean over every frame of every stream.
    pub fn mean_latency(&self) -> Option<Duration> {
        let count: u32 = self.streams.iter().map(|s| s.latency_count).sum();
        let total: Duration = self.streams.iter().map(|s| s.total_latency).sum();
        (count > 0).then(|| total / count)
    }

    pub fn max_latency(&self) -> Option<Duration> {
        self.streams.iter().filter_map(|s| s.max_latency()).max()
    }

    /// Every drop of every stream: in the elements (frames that never left), sinks' and
    /// other elements' QoS messages, leaky queues' overruns. (An element's QoS messages are
    /// its frames that never left, already counted.)
    pub fn dropped(&self) -> u64 {
        self.streams
            .iter()
            .map(|s| s.dropped_in_element + s.qos_sinks + s.queue_overruns + s.qos_other.values().sum::<u64>())
            .sum()
    }

    /// The live display's total line: `total 20.0 fps  latency mean 110 ms, max 158 ms  dropped 3`.
    pub fn status(&self, now: Duration) -> String {
        let mut parts = vec![match self.rolling_fps(now) {
            Some(fps) => format!("total {fps:.1} fps"),
            None => "total -- fps".into(),
        }];
        if let (Some(mean), Some(max)) = (self.mean_latency(), self.max_latency()) {
            parts.push(format!("latency mean {} ms, max {} ms", ms(mean), ms(max)));
        }
        parts.push(format!("dropped {}", self.dropped()));
        parts.join("  ")
    }

    /// The live display for several streams: the total line, then one line per stream,
    /// `NAME: ` and its [`LiveStats::status`].
    pub fn status_lines(names: &[&str], streams: &[&LiveStats], now: Duration) -> Vec<String> {
        let mut lines = vec![Totals::new(streams.iter().copied()).status(now)];
        for (name, stats) in names.iter().zip(streams) {
            lines.push(format!("{name}: {}", stats.status(now)));
        }
        lines
    }

    /// The summary's total line: frames out of every stream in `elapsed`, the summed mean
    /// rates, latency over all frames, the drops.
    pub fn summary(&self, elapsed: Duration) -> String {
        let mut details = Vec::new();
        if let Some(fps) = self.mean_fps() {
            details.push(format!("{fps:.2} fps in all after each stream's first frame"));
        }
        if let (Some(mean), Some(max)) = (self.mean_latency(), self.max_latency()) {
            details.push(format!("latency mean {} ms, max {} ms", ms(mean), ms(max)));
        }
        details.push(format!("{} dropped", self.dropped()));
        format!(
            "total: {} frames of {} streams in {:.1} s ({})",
            self.frames_out(),
            self.streams.len(),
            elapsed.as_secs_f64(),
            details.join("; ")
        )
    }
}

fn sum_some(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    values.fold(None, |sum, v| match (sum, v) {
        (None, v) => v,
        (Some(s), Some(v)) => Some(s + v),
        (s, None) => s,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// PTS of frame `i` at 25 fps, in nanoseconds.
    fn pts(i: u64) -> Option<u64> {
        Some(i * 40_000_000)
    }

    #[test]
    fn rolling_fps_counts_the_last_two_seconds() {
        let mut stats = LiveStats::default();
        assert_eq!(stats.rolling_fps(at(0)), None);
        // 10 fps for 3 s: one output every 100 ms from 1 s on.
        for i in 0..30 {
            stats.entered(pts(i), at(1000 + 100 * i - 50));
            stats.left(pts(i), at(1000 + 100 * i));
        }
        // Before the window is full: from the first output to the last.
        let mut early = LiveStats::default();
        for i in 0..5 {
            early.left(pts(i), at(1000 + 100 * i));
        }
        assert!((early.rolling_fps(at(1400)).unwrap() - 10.0).abs() < 1e-9);
        let mut single = LiveStats::default();
        single.left(pts(0), at(1000));
        assert_eq!(single.rolling_fps(at(1500)), None);
        // Full window: 20 outputs in (1.9 s, 3.9 s].
        assert!((stats.rolling_fps(at(3900)).unwrap() - 10.0).abs() < 1e-9);
        // Then the rate doubles to 20 fps for 2 s: the window sees only the new rate.
        for i in 0..40 {
            stats.left(None, at(4000 + 50 * i));
        }
        assert!((stats.rolling_fps(at(5950)).unwrap() - 20.0).abs() < 1e-9);
        // Outputs stop: the rate decays to zero over the window.
        assert!((stats.rolling_fps(at(6950)).unwrap() - 10.0).abs() < 1e-9);
        assert_eq!(stats.rolling_fps(at(8000)), Some(0.0));
        // The mean rate runs from the first output to the last: 69 intervals in 4.95 s.
        assert!((stats.mean_fps().unwrap() - 69.0 / 4.95).abs() < 1e-9);
    }

    #[test]
    fn latency_is_matched_by_pts_across_frames_held_in_the_element() {
        let mut stats = LiveStats::default();
        // The element holds two frames (a stream batch): frame i leaves when frame i+2 enters.
        for i in 0..10 {
            stats.entered(pts(i), at(100 * i));
            if i >= 2 {
                stats.left(pts(i - 2), at(100 * i + 30));
            }
        }
        assert_eq!((stats.frames_in, stats.frames_out, stats.in_flight()), (10, 8, 2));
        assert_eq!(stats.last_latency(), Some(at(230)));
        assert_eq!(stats.mean_latency(), Some(at(230)));
        assert_eq!(stats.max_latency(), Some(at(230)));
        assert_eq!((stats.dropped_in_element, stats.out_of_order, stats.unmatched_out), (0, 0, 0));
        // EOS drains the last two.
        stats.left(pts(8), at(1000));
        stats.left(pts(9), at(1010));
        assert_eq!(stats.in_flight(), 0);
        assert_eq!(stats.last_latency(), Some(at(110)));
        assert_eq!(stats.max_latency(), Some(at(230)));
        assert_eq!(stats.mean_latency(), Some((at(230) * 8 + at(200) + at(110)) / 10));
    }

    #[test]
    fn frames_that_never_come_out_are_drops() {
        let mut stats = LiveStats::default();
        for i in 0..6 {
            stats.entered(pts(i), at(100 * i));
        }
        // Frames 1, 2 and 4 were dropped (QoS): 0, 3 and 5 come out.
        stats.left(pts(0), at(50));
        stats.left(pts(3), at(350));
        assert_eq!(stats.dropped_in_element, 2);
        stats.left(pts(5), at(550));
        assert_eq!((stats.dropped_in_element, stats.in_flight(), stats.frames_out), (3, 0, 3));
        // Each output's latency is its own frame's, not a dropped one's.
        assert_eq!(stats.max_latency(), Some(at(50)));
        assert_eq!((stats.out_of_order, stats.unmatched_out), (0, 0));
        // Buffers without a PTS match in order of entry.
        stats.entered(None, at(600));
        stats.entered(None, at(610));
        stats.left(None, at(700));
        assert_eq!(stats.last_latency(), Some(at(100)));
        assert_eq!(stats.in_flight(), 1);
        // An output whose PTS never entered is counted apart and leaves the rest alone.
        stats.left(Some(123), at(710));
        assert_eq!((stats.unmatched_out, stats.in_flight(), stats.dropped_in_element), (1, 1, 3));
    }

    #[test]
    fn a_frame_out_of_order_is_reported_and_not_left_a_drop() {
        let mut stats = LiveStats::default();
        for i in 0..3 {
            stats.entered(pts(i), at(100 * i));
        }
        stats.left(pts(1), at(250));
        assert_eq!(stats.dropped_in_element, 1);
        // Frame 0 after frame 1: the element broke the order, which must show.
        stats.left(pts(0), at(260));
        assert_eq!((stats.dropped_in_element, stats.out_of_order, stats.unmatched_out), (0, 1, 0));
        assert!(stats.status(at(300)).contains("1 out of order"), "{}", stats.status(at(300)));
        stats.left(pts(2), at(270));
        assert_eq!((stats.in_flight(), stats.out_of_order), (0, 1));
    }

    #[test]
    fn a_stuck_element_does_not_grow_the_pending_list() {
        let mut stats = LiveStats::default();
        for i in 0..(MAX_PENDING as u64 + 10) {
            stats.entered(pts(i), at(i));
        }
        assert_eq!((stats.in_flight(), stats.dropped_in_element), (MAX_PENDING, 10));
    }

    #[test]
    fn status_and_summary_texts() {
        let mut stats = LiveStats::default();
        assert_eq!(stats.status(at(0)), "-- fps  dropped 0 in element (QoS 0), 0 sinks");
        for i in 0..100 {
            stats.entered(pts(i), at(5000 + 40 * i));
            if i % 10 != 9 {
                stats.left(pts(i), at(5000 + 40 * i + 60 + i));
            }
        }
        stats.qos_element = 9;
        stats.qos_sinks = 2;
        stats.qos_other.insert("videoconvert0".into(), 4);
        stats.qos_other.insert("videoscale0".into(), 1);
        stats.leaky_queues = 1;
        stats.queue_overruns = 17;
        stats.pipeline_latency = Some(at(150));
        // Frame 99 (dropped) is still pending: 9 drops are known.
        assert_eq!(
            stats.status(at(9100)),
            "22.5 fps  latency 158 ms (mean 109, max 158; pipeline 150)  dropped 9 in element (QoS 9), 2 sinks, 17 queue, 5 other"
        );
        assert_eq!(
            stats.summary(Duration::from_secs_f64(20.04), true),
            "90 frames in 20.0 s (22.15 fps after the first frame; latency mean 109 ms, max 158 ms \
             (pipeline 150 ms); dropped 9 in sdcrossframe (QoS 9), 2 by sinks (QoS), 17 by the leaky queue, \
             4 by videoconvert0 (QoS), 1 by videoscale0 (QoS); 1 still in the element)"
        );
        // A file: no drops, no pipeline latency; the summary starts as the tests expect.
        let mut file = LiveStats::default();
        for i in 0..50 {
            file.entered(pts(i), at(1000 + 200 * i));
            file.left(pts(i), at(1000 + 200 * i + 150));
        }
        assert_eq!(
            file.summary(Duration::from_secs(12), false),
            "50 frames in 12.0 s (5.00 fps after the first frame; latency mean 150 ms, max 150 ms)"
        );
        assert_eq!(LiveStats::default().summary(Duration::from_secs(1), false), "0 frames in 1.0 s");
        // Stopped at once (a second Ctrl-C): frames left in the element are not drops.
        file.entered(pts(50), at(12_000));
        file.entered(pts(51), at(12_040));
        assert!(file.summary(Duration::from_secs(13), false).ends_with("max 150 ms; 2 still in the element)"));
    }
    #[test]
    fn totals_add_the_streams_up() {
        // Stream a: 10 fps, 200 ms latency; stream b: 5 fps, 300 ms, two frames dropped.
        let (mut a, mut b) = (LiveStats::default(), LiveStats::default());
        for i in 0..40 {
            a.entered(pts(i), at(1000 + 100 * i));
            a.left(pts(i), at(1200 + 100 * i));
        }
        for i in 0..20 {
            b.entered(pts(i), at(1000 + 200 * i));
            if i != 7 && i != 8 {
                b.left(pts(i), at(1300 + 200 * i));
            }
        }
        b.queue_overruns = 3;
        b.leaky_queues = 1;
        let now = at(5100);
        let total = Totals::new([&a, &b]);
        assert_eq!(total.frames_out(), 58);
        assert!((total.rolling_fps(now).unwrap() - 15.0).abs() < 1e-9, "{:?}", total.rolling_fps(now));
        assert!((total.mean_fps().unwrap() - (39.0 / 3.9 + 17.0 / 3.8)).abs() < 1e-9);
        assert_eq!(total.mean_latency(), Some((at(200) * 40 + at(300) * 18) / 58));
        assert_eq!(total.max_latency(), Some(at(300)));
        assert_eq!(total.dropped(), 5);
        assert_eq!(total.status(now), "total 15.0 fps  latency mean 231 ms, max 300 ms  dropped 5");
        let lines = Totals::status_lines(&["left", "right"], &[&a, &b], now);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], total.status(now));
        assert_eq!(lines[1], format!("left: {}", a.status(now)));
        assert!(lines[2].starts_with("right: 5.0 fps  latency 300 ms (mean 300, max 300)"), "{}", lines[2]);
        assert!(lines[2].ends_with("dropped 2 in element (QoS 0), 0 sinks, 3 queue"), "{}", lines[2]);
        assert_eq!(
            total.summary(Duration::from_secs(6)),
            "total: 58 frames of 2 streams in 6.0 s (14.47 fps in all after each stream's first frame; \
             latency mean 231 ms, max 300 ms; 5 dropped)"
        );
        // No output yet: no rate, no latency.
        let empty = LiveStats::default();
        assert_eq!(Totals::new([&empty, &empty]).status(at(0)), "total -- fps  dropped 0");
    }
}
