//! The processing size: the one rule that turns an input frame's size and the user's
//! requested width/height into the size the models run at (the element, the CLI and the
//! session all use it).

use anyhow::{Result, bail};

/// Short side of the default processing size (the original project's 512).
pub const DEFAULT_SHORT_SIDE: usize = 512;

/// The requested processing size: `width`/`height` as the user gave them, 0 meaning "derive".
/// Both 0 scales the short side to [`DEFAULT_SHORT_SIDE`] keeping the aspect ratio; one of
/// them 0 follows the aspect ratio from the other; both set are used as they are. Every side
/// is rounded to the nearest multiple of the model's size factor (at least one factor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SizeRequest {
    pub width: usize,
    pub height: usize,
}

impl SizeRequest {
    /// Both sides given.
    pub fn exact(width: usize, height: usize) -> Self {
        Self { width, height }
    }

    /// The size a `width` x `height` frame is processed at by a model whose sizes must be
    /// multiples of `factor` (the VAE's downscale factor).
    pub fn resolve(self, width: usize, height: usize, factor: usize) -> Result<(usize, usize)> {
        if width == 0 || height == 0 {
            bail!("frame size {width}x{height} is empty");
        }
        if factor == 0 {
            bail!("the model's size factor is 0");
        }
        let round = |value: f64| ((value / factor as f64).round() as usize).max(1) * factor;
        let (w, h) = (width as f64, height as f64);
        Ok(match (self.width, self.height) {
            (0, 0) => {
                let scale = DEFAULT_SHORT_SIDE as f64 / w.min(h);
                (round(w * scale), round(h * scale))
            }
            (rw, 0) => (round(rw as f64), round(rw as f64 * h / w)),
            (0, rh) => (round(rh as f64 * w / h), round(rh as f64)),
            (rw, rh) => (round(rw as f64), round(rh as f64)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(input: (usize, usize), requested: (usize, usize)) -> (usize, usize) {
        SizeRequest::exact(requested.0, requested.1).resolve(input.0, input.1, 8).unwrap()
    }

    #[test]
    fn default_keeps_the_aspect_ratio_with_a_short_side_of_512() {
        assert_eq!(size((962, 506), (0, 0)), (976, 512));
        assert_eq!(size((640, 480), (0, 0)), (680, 512));
        assert_eq!(size((480, 640), (0, 0)), (512, 680));
        assert_eq!(size((512, 512), (0, 0)), (512, 512));
        assert_eq!(size((1, 1), (0, 0)), (512, 512));
    }

    #[test]
    fn requested_sides_are_rounded_to_the_factor() {
        assert_eq!(size((962, 506), (96, 64)), (96, 64));
        assert_eq!(size((962, 506), (100, 0)), (104, 56));
        assert_eq!(size((962, 506), (0, 3)), (8, 8));
        assert_eq!(size((50, 30), (51, 29)), (48, 32));
    }

    #[test]
    fn empty_frames_are_refused() {
        let err = SizeRequest::default().resolve(0, 10, 8).unwrap_err().to_string();
        assert!(err.contains("0x10 is empty"), "{err}");
    }
}
