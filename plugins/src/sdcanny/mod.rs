//! `sdcanny`: the Canny edge map the ControlNet of `sdcrossframe` sees, as video.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct SdCanny(ObjectSubclass<imp::SdCanny>) @extends gst_video::VideoFilter, gst_base::BaseTransform, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(Some(plugin), "sdcanny", gst::Rank::NONE, SdCanny::static_type())
}
