//! GStreamer plugin `sdcrossframe`: Stable Diffusion 1.5 + Canny ControlNet video restyling
//! with cross-frame attention, as a video filter.
//!
//! Elements:
//! - `sdcrossframe` restyles every frame with a [`sdcrossframe::session::VideoSession`].
//! - `sdcanny` shows the Canny edge map the ControlNet sees (to tune thresholds).
//!
//! `plugin_init` only registers types: the models load when an element starts.

use gst::glib;

pub mod engine_log;
pub mod sdcanny;
pub mod sdcrossframe;
pub mod video;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    sdcrossframe::register(plugin)?;
    sdcanny::register(plugin)?;
    Ok(())
}

gst::plugin_define!(
    sdcrossframe,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MIT/X11",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY"),
    env!("BUILD_REL_DATE")
);
