//! The frame is converted to RGB, scaled to the processing size `sdcrossframe` would use
//! (Lanczos, as the engine does), run through the engine's OpenCV-compatible Canny, and the
//! edge map is scaled back to the frame size (nearest neighbour, so it stays binary).
//! Output: GRAY8 (255 on edges) or RGB (the edges in all three channels, as the ControlNet's
//! control image).

use std::sync::{LazyLock, Mutex};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;
use gst_video::prelude::*;
use gst_video::subclass::prelude::*;
use sdcrossframe::canny::{self, CannyParams, ImageView};
use sdcrossframe::pipeline::SizeRequest;

use crate::video::{self, PixelLayout};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new("sdcanny", gst::DebugColorFlags::empty(), Some("Canny edges as the ControlNet sees them"))
});

/// Frame sizes are rounded to this, as for Stable Diffusion's VAE.
const SIZE_FACTOR: usize = 8;
const MAX_THRESHOLD: f64 = 65535.0;
const MAX_SIZE: u32 = 16384;

#[derive(Debug, Clone, Copy, PartialEq)]
struct Settings {
    low: f64,
    high: f64,
    l2: bool,
    width: u32,
    height: u32,
}

impl Default for Settings {
    fn default() -> Self {
        let canny = CannyParams::default();
        Self { low: canny.low, high: canny.high, l2: canny.l2_gradient, width: 0, height: 0 }
    }
}

#[derive(Default)]
pub struct SdCanny {
    settings: Mutex<Settings>,
}

#[glib::object_subclass]
impl ObjectSubclass for SdCanny {
    const NAME: &'static str = "GstSdCanny";
    type Type = super::SdCanny;
    type ParentType = gst_video::VideoFilter;
}

impl ObjectImpl for SdCanny {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            let d = Settings::default();
            vec![
                glib::ParamSpecDouble::builder("canny-low")
                    .nick("Canny low threshold")
                    .blurb("Hysteresis low threshold (cv2.Canny's threshold1); must not exceed canny-high")
                    .minimum(0.0)
                    .maximum(MAX_THRESHOLD)
                    .default_value(d.low)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("canny-high")
                    .nick("Canny high threshold")
                    .blurb("Hysteresis high threshold (cv2.Canny's threshold2)")
                    .minimum(0.0)
                    .maximum(MAX_THRESHOLD)
                    .default_value(d.high)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("canny-l2")
                    .nick("L2 gradient")
                    .blurb("Use the L2 gradient magnitude (cv2.Canny's L2gradient) instead of L1")
                    .default_value(d.l2)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("width")
                    .nick("Processing width")
                    .blurb("Width the edges are computed at, rounded to a multiple of 8 (0: as sdcrossframe's default, short side 512 keeping the aspect ratio)")
                    .maximum(MAX_SIZE)
                    .default_value(d.width)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("height")
                    .nick("Processing height")
                    .blurb("Height the edges are computed at, rounded to a multiple of 8 (0: as sdcrossframe's default, short side 512 keeping the aspect ratio)")
                    .maximum(MAX_SIZE)
                    .default_value(d.height)
                    .mutable_playing()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut settings = self.settings.lock().unwrap();
        match pspec.name() {
            "canny-low" => settings.low = value.get().expect("type checked upstream"),
            "canny-high" => settings.high = value.get().expect("type checked upstream"),
            "canny-l2" => settings.l2 = value.get().expect("type checked upstream"),
            "width" => settings.width = value.get().expect("type checked upstream"),
            "height" => settings.height = value.get().expect("type checked upstream"),
            name => unimplemented!("property {name}"),
        }
        gst::debug!(CAT, imp = self, "{} set to {:?}", pspec.name(), value);
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let settings = self.settings.lock().unwrap();
        match pspec.name() {
            "canny-low" => settings.low.to_value(),
            "canny-high" => settings.high.to_value(),
            "canny-l2" => settings.l2.to_value(),
            "width" => settings.width.to_value(),
            "height" => settings.height.to_value(),
            name => unimplemented!("property {name}"),
        }
    }
}

impl GstObjectImpl for SdCanny {}

fn caps_with_formats(formats: &[gst_video::VideoFormat]) -> gst::Caps {
    gst_video::VideoCapsBuilder::new().format_list(formats.iter().copied()).build()
}

const OUTPUT_FORMATS: &[gst_video::VideoFormat] = &[gst_video::VideoFormat::Gray8, gst_video::VideoFormat::Rgb];

impl ElementImpl for SdCanny {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Canny edges for Stable Diffusion ControlNet",
                "Filter/Effect/Video",
                "Outputs the Canny edge map sdcrossframe's ControlNet sees (OpenCV-compatible Canny at the processing size)",
                "sdcrossframe developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static PAD_TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let src = gst::PadTemplate::new(
                "src",
                gst::PadDirection::Src,
                gst::PadPresence::Always,
                &caps_with_formats(OUTPUT_FORMATS),
            )
            .unwrap();
            let sink = gst::PadTemplate::new(
                "sink",
                gst::PadDirection::Sink,
                gst::PadPresence::Always,
                &caps_with_formats(video::RGB_FORMATS),
            )
            .unwrap();
            vec![src, sink]
        });
        PAD_TEMPLATES.as_ref()
    }
}

impl BaseTransformImpl for SdCanny {
    const MODE: gst_base::subclass::BaseTransformMode = gst_base::subclass::BaseTransformMode::NeverInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = false;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = false;

    fn transform_caps(
        &self,
        direction: gst::PadDirection,
        caps: &gst::Caps,
        filter: Option<&gst::Caps>,
    ) -> Option<gst::Caps> {
        let formats = if direction == gst::PadDirection::Src { video::RGB_FORMATS } else { OUTPUT_FORMATS };
        let mut other = caps.clone();
        {
            let other = other.make_mut();
            for s in other.iter_mut() {
                s.set("format", gst::List::new(formats.iter().map(|f| f.to_str())));
            }
        }
        gst::debug!(CAT, imp = self, "transformed {caps:?} ({direction:?}) to {other:?}");
        match filter {
            Some(filter) => Some(filter.intersect_with_mode(&other, gst::CapsIntersectMode::First)),
            None => Some(other),
        }
    }
}

impl VideoFilterImpl for SdCanny {
    fn transform_frame(
        &self,
        inframe: &gst_video::VideoFrameRef<&gst::BufferRef>,
        outframe: &mut gst_video::VideoFrameRef<&mut gst::BufferRef>,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let settings = *self.settings.lock().unwrap();
        let params = CannyParams { low: settings.low, high: settings.high, l2_gradient: settings.l2 };
        if let Err(e) = params.validate() {
            gst::element_imp_error!(self, gst::LibraryError::Settings, ("Invalid Canny thresholds: {e:#}"));
            return Err(gst::FlowError::Error);
        }
        let (width, height) = (inframe.width() as usize, inframe.height() as usize);
        let layout = PixelLayout::of(inframe.format()).ok_or(gst::FlowError::NotNegotiated)?;
        let edges = (|| {
            let request = SizeRequest { width: settings.width as usize, height: settings.height as usize };
            let (pw, ph) = request.resolve(width, height, SIZE_FACTOR)?;
            let stride = inframe.plane_stride()[0] as usize;
            let rgb = video::to_rgb_scaled(inframe.plane_data(0)?, width, height, stride, layout, (pw, ph))?;
            let edges = canny::canny(&ImageView::packed(&rgb.data, pw, ph, 3)?, &params)?;
            anyhow::Ok(video::resize_nearest(&edges.data, pw, ph, width, height))
        })();
        let edges = match edges {
            Ok(edges) => edges,
            Err(e) => {
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Failed,
                    ("Canny failed on a {width}x{height} frame: {e:#}")
                );
                return Err(gst::FlowError::Error);
            }
        };

        let out_format = outframe.format();
        let stride = outframe.plane_stride()[0] as usize;
        let out = outframe.plane_data_mut(0).map_err(|_| gst::FlowError::Error)?;
        for (y, row) in edges.chunks_exact(width).enumerate() {
            let dst = &mut out[y * stride..];
            match out_format {
                gst_video::VideoFormat::Gray8 => dst[..width].copy_from_slice(row),
                gst_video::VideoFormat::Rgb => {
                    for (px, &e) in dst[..width * 3].chunks_exact_mut(3).zip(row) {
                        px.fill(e);
                    }
                }
                _ => return Err(gst::FlowError::NotNegotiated),
            }
        }
        Ok(gst::FlowSuccess::Ok)
    }
}
