//! The engine's `tracing` events in the GStreamer debug log, category `sdcrossframe-engine`, on
//! the element that ran the work: `GST_DEBUG=sdcrossframe-engine:4` shows what the engine warns
//! about (a prompt cut at the text encoder's length, LoRA layers for weights the model never
//! loaded, a CUDA graph capture that failed, an environment switch with a value it does not
//! know). Without this they went nowhere: GStreamer applications do not set up `tracing`.
//!
//! Installed per thread for the duration of the element's work ([`EngineLog::enter`]), and only
//! where no `tracing` subscriber of the application's is in place: an application that set its
//! own keeps the events. Spans are not forwarded (GStreamer's log has none); only events.

use std::fmt::Write as _;
use std::sync::LazyLock;

use gst::glib;
use gst::prelude::*;
use tracing::dispatcher::{DefaultGuard, Dispatch};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::{Interest, NoSubscriber};
use tracing::{Event, Level, Metadata, Subscriber};

pub static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "sdcrossframe-engine",
        gst::DebugColorFlags::empty(),
        Some("The sdcrossframe engine's own messages (models, text encoder, scheduler, GPU kernels)"),
    )
});

/// The bridge of one element (its events are logged on it).
#[derive(Clone)]
pub struct EngineLog {
    dispatch: Dispatch,
}

impl EngineLog {
    pub fn new(element: &gst::Element) -> Self {
        Self { dispatch: Dispatch::new(Bridge { element: element.downgrade() }) }
    }

    /// Sends the calling thread's engine events to this element's GStreamer log until the
    /// guard drops, unless the application's subscriber is in place. Another element's bridge
    /// is replaced until then: an element upstream in the same thread (its push runs this
    /// one's chain) must not get this one's events.
    #[must_use]
    pub fn enter(&self) -> Option<DefaultGuard> {
        let ours = tracing::dispatcher::get_default(|current| current.is::<NoSubscriber>() || current.is::<Bridge>());
        ours.then(|| tracing::dispatcher::set_default(&self.dispatch))
    }
}

struct Bridge {
    element: glib::WeakRef<gst::Element>,
}

fn gst_level(level: &Level) -> gst::DebugLevel {
    match *level {
        Level::ERROR => gst::DebugLevel::Error,
        Level::WARN => gst::DebugLevel::Warning,
        Level::INFO => gst::DebugLevel::Info,
        Level::DEBUG => gst::DebugLevel::Debug,
        Level::TRACE => gst::DebugLevel::Trace,
    }
}

impl Subscriber for Bridge {
    fn register_callsite(&self, _metadata: &'static Metadata<'static>) -> Interest {
        // The category's threshold can change at run time: ask every time.
        Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event() && gst_level(metadata.level()) <= CAT.threshold()
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        // Never asked: spans are disabled (see `enabled`).
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let metadata = event.metadata();
        let mut text = Text::default();
        event.record(&mut text);
        let file = glib::GString::from(metadata.file().unwrap_or("engine"));
        CAT.log(
            self.element.upgrade().as_ref(),
            gst_level(metadata.level()),
            file.as_gstr(),
            metadata.target(),
            metadata.line().unwrap_or(0),
            format_args!("{}", text.0),
        );
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// An event's message, then its other fields as `name=value`.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let fields = std::mem::take(&mut self.0);
            let _ = write!(self.0, "{value:?}");
            if !fields.is_empty() {
                self.0.push_str(&fields);
            }
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}
