//! The `SDCROSSFRAME_*` environment switches of the GPU backend, read once per process and
//! parsed one way: values are trimmed and compared without case; an unknown value is logged
//! (variable, value, accepted values) and the default is used. DEVELOPERS.md ("GPU backend
//! switches") lists them. They only change how CUDA runs; the CPU always takes the reference
//! paths.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;

pub const ATTENTION: &str = "SDCROSSFRAME_ATTENTION";
pub const GROUP_NORM: &str = "SDCROSSFRAME_GROUP_NORM";
pub const FUSED: &str = "SDCROSSFRAME_FUSED";
pub const CONV: &str = "SDCROSSFRAME_CONV";
pub const CUDA_GRAPHS: &str = "SDCROSSFRAME_CUDA_GRAPHS";
pub const FLASH_WARPS: &str = "SDCROSSFRAME_FLASH_WARPS";
pub const CONV_PLANS: &str = "SDCROSSFRAME_CONV_PLANS";
pub const VAE_STREAM: &str = "SDCROSSFRAME_VAE_STREAM";
pub const CHANNELS_LAST: &str = "SDCROSSFRAME_CHANNELS_LAST";
pub const FF_CHUNK: &str = "SDCROSSFRAME_FF_CHUNK";
pub const UPSAMPLE: &str = "SDCROSSFRAME_UPSAMPLE";
pub const EAGER_TRIM: &str = "SDCROSSFRAME_EAGER_TRIM";

/// Which convolutions the cuDNN build considers for f16/bf16 on CUDA (`SDCROSSFRAME_CONV`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvChoice {
    /// Every cuDNN algorithm and im2col + GEMM, timed once per shape; the fastest wins.
    Auto,
    /// im2col + GEMM only.
    Im2col,
    /// cuDNN algorithms only (still timed per shape).
    Cudnn,
}

/// Where the convolution tuner keeps its choices (`SDCROSSFRAME_CONV_PLANS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConvPlans {
    /// Unset: a file per GPU model, driver and cuDNN version in the per-user cache directory
    /// (`$XDG_CACHE_HOME/sdcrossframe/` or `$HOME/.cache/sdcrossframe/`).
    CacheDir,
    /// `off` or empty: no file; every process tunes again.
    Off,
    /// Any other value: this file, whatever the GPU.
    File(PathBuf),
}

/// The switches' values; [`Switches::default`] is what an unset environment gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switches {
    /// `SDCROSSFRAME_ATTENTION=fused|unfused`: the fused attention kernel.
    pub fused_attention: bool,
    /// `SDCROSSFRAME_GROUP_NORM=fused|two-pass|unfused`: the GroupNorm (+ SiLU) kernels.
    pub fused_group_norm: bool,
    /// `SDCROSSFRAME_GROUP_NORM=two-pass`: the kernels' two-launch form even for rows that fit
    /// one block's registers (for comparisons).
    pub group_norm_two_pass: bool,
    /// `SDCROSSFRAME_FUSED=on|off`: the fused bias/residual, GEGLU and LayerNorm kernels and
    /// 1x1 convolutions as GEMMs.
    pub fused_epilogues: bool,
    /// `SDCROSSFRAME_CONV=auto|im2col|cudnn`.
    pub conv: ConvChoice,
    /// `SDCROSSFRAME_CUDA_GRAPHS=on|off`: denoising steps captured and replayed as CUDA graphs.
    pub cuda_graphs: bool,
    /// `SDCROSSFRAME_FLASH_WARPS=auto|4|8`: warps per block of the attention kernel; `None`
    /// chooses by the number of queries.
    pub flash_warps: Option<usize>,
    /// `SDCROSSFRAME_CONV_PLANS=FILE|off`: where the convolution tuner keeps its choices.
    pub conv_plans: ConvPlans,
    /// `SDCROSSFRAME_VAE_STREAM=on|off`: a session's VAE encoding and decoding, the control
    /// image's embedding, the scaling back and the download on a second CUDA stream beside
    /// the UNet's.
    pub vae_stream: bool,
    /// `SDCROSSFRAME_CHANNELS_LAST=on|resnets|off`: resnet blocks with time embeddings (the
    /// UNet's and the ControlNet's) run channels-last between their convolutions
    /// ([`super::channels_last`]).
    pub channels_last: bool,
    /// `SDCROSSFRAME_CHANNELS_LAST=on` (not `resnets`): the tiny VAE and the control image's
    /// embedding run channels-last from their input to their output, and the SD VAE's resnet
    /// blocks (no time embedding) between their convolutions.
    pub channels_last_stages: bool,
    /// `SDCROSSFRAME_FF_CHUNK=on|off`: the transformers' feed-forwards run in token chunks
    /// when their GEGLU projection would hold more than
    /// [`crate::models::attention::FEED_FORWARD_CHUNK_BYTES`] (many-row calls).
    pub feed_forward_chunks: bool,
    /// `SDCROSSFRAME_UPSAMPLE=subpixel|nearest`: 2x upsamplers (nearest + 3x3 convolution) as
    /// one 2x2 convolution per output phase on NHWC data ([`super::subpixel`]), where the
    /// resnets run channels-last; `nearest`: upsampling, then the convolution.
    pub subpixel_upsample: bool,
    /// `SDCROSSFRAME_EAGER_TRIM=on|off`: before a denoising step runs eagerly while captured
    /// steps hold device memory, wait for it and give idle graphs' memory back
    /// ([`super::step_graphs`]).
    pub eager_trim: bool,
}

impl Default for Switches {
    fn default() -> Self {
        Self::from_lookup(|_| None)
    }
}

impl Switches {
    /// The switches as `lookup` (a variable name to its value) gives them.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Self {
        let on_off = [("on", true), ("off", false)];
        let fused_unfused = [("fused", true), ("unfused", false)];
        Self {
            fused_attention: parse(&lookup, ATTENTION, &fused_unfused, true),
            fused_group_norm: parse(
                &lookup,
                GROUP_NORM,
                &[("fused", true), ("two-pass", true), ("unfused", false)],
                true,
            ),
            group_norm_two_pass: parse(
                &lookup,
                GROUP_NORM,
                &[("fused", false), ("two-pass", true), ("unfused", false)],
                false,
            ),
            fused_epilogues: parse(&lookup, FUSED, &on_off, true),
            conv: parse(
                &lookup,
                CONV,
                &[("auto", ConvChoice::Auto), ("im2col", ConvChoice::Im2col), ("cudnn", ConvChoice::Cudnn)],
                ConvChoice::Auto,
            ),
            cuda_graphs: parse(&lookup, CUDA_GRAPHS, &on_off, true),
            flash_warps: parse(&lookup, FLASH_WARPS, &[("auto", None), ("4", Some(4)), ("8", Some(8))], None),
            conv_plans: parse_conv_plans(lookup(CONV_PLANS)),
            vae_stream: parse(&lookup, VAE_STREAM, &on_off, true),
            channels_last: parse(&lookup, CHANNELS_LAST, &[("on", true), ("resnets", true), ("off", false)], true),
            channels_last_stages: parse(
                &lookup,
                CHANNELS_LAST,
                &[("on", true), ("resnets", false), ("off", false)],
                true,
            ),
            feed_forward_chunks: parse(&lookup, FF_CHUNK, &on_off, true),
            subpixel_upsample: parse(&lookup, UPSAMPLE, &[("subpixel", true), ("nearest", false)], true),
            eager_trim: parse(&lookup, EAGER_TRIM, &on_off, true),
        }
    }
}

/// The process's switches, read from the environment on first use.
pub fn switches() -> &'static Switches {
    static SWITCHES: OnceLock<Switches> = OnceLock::new();
    SWITCHES.get_or_init(|| Switches::from_lookup(|name| std::env::var_os(name)))
}

/// `SDCROSSFRAME_CONV_PLANS`: unset is the cache directory; trimmed, `off` (any case) or
/// empty is no file; anything else is a path (trimmed; `./off` names a file called `off`).
fn parse_conv_plans(raw: Option<OsString>) -> ConvPlans {
    let Some(raw) = raw else { return ConvPlans::CacheDir };
    let value = raw.to_string_lossy();
    let value = value.trim();
    if value.is_empty() || value.eq_ignore_ascii_case("off") {
        return ConvPlans::Off;
    }
    // A path that is not UTF-8 is kept as given, untrimmed.
    match raw.to_str() {
        Some(path) => ConvPlans::File(PathBuf::from(path.trim())),
        None => ConvPlans::File(PathBuf::from(raw)),
    }
}

/// `var`'s value among `accepted` (names in lower case), or `default` when unset or unknown.
fn parse<T: Copy + PartialEq>(
    lookup: &impl Fn(&str) -> Option<OsString>,
    var: &str,
    accepted: &[(&str, T)],
    default: T,
) -> T {
    let Some(raw) = lookup(var) else { return default };
    let value = raw.to_string_lossy();
    let wanted = value.trim().to_ascii_lowercase();
    if let Some(&(_, v)) = accepted.iter().find(|(name, _)| *name == wanted) {
        return v;
    }
    let names: Vec<&str> = accepted.iter().map(|(name, _)| *name).collect();
    let default_name = accepted.iter().find(|(_, v)| *v == default).map_or("?", |(name, _)| name);
    tracing::warn!("{var}={value:?} is not one of {}: using {default_name}", names.join(", "));
    default
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Switches {
        Switches::from_lookup(|name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| OsString::from(v)))
    }

    #[test]
    fn unset_means_everything_on() {
        let s = from(&[]);
        assert_eq!(
            s,
            Switches {
                fused_attention: true,
                fused_group_norm: true,
                group_norm_two_pass: false,
                fused_epilogues: true,
                conv: ConvChoice::Auto,
                cuda_graphs: true,
                flash_warps: None,
                conv_plans: ConvPlans::CacheDir,
                vae_stream: true,
                channels_last: true,
                channels_last_stages: true,
                feed_forward_chunks: true,
                subpixel_upsample: true,
                eager_trim: true,
            }
        );
        assert_eq!(s, Switches::default());
    }

    #[test]
    fn values_are_trimmed_and_case_insensitive() {
        let s = from(&[
            (ATTENTION, " Unfused "),
            (GROUP_NORM, "UNFUSED"),
            (FUSED, "Off\n"),
            (CONV, "cuDNN"),
            (CUDA_GRAPHS, " OFF"),
            (FLASH_WARPS, " 8 "),
            (CONV_PLANS, " /tmp/plans.txt\n"),
            (VAE_STREAM, " Off "),
            (CHANNELS_LAST, "OFF"),
            (FF_CHUNK, " oFF"),
            (UPSAMPLE, "Nearest "),
            (EAGER_TRIM, " OFF "),
        ]);
        assert!(!s.feed_forward_chunks && !s.subpixel_upsample && !s.eager_trim);
        assert!(!s.fused_attention && !s.fused_group_norm && !s.fused_epilogues && !s.cuda_graphs && !s.vae_stream);
        assert!(!s.channels_last && !s.channels_last_stages);
        assert_eq!((s.conv, s.flash_warps), (ConvChoice::Cudnn, Some(8)));
        assert_eq!(s.conv_plans, ConvPlans::File(PathBuf::from("/tmp/plans.txt")));
        let s = from(&[(CHANNELS_LAST, " Resnets ")]);
        assert!(s.channels_last && !s.channels_last_stages);
        let s = from(&[(ATTENTION, "fused"), (FUSED, "on"), (CONV, "im2col"), (FLASH_WARPS, "4"), (CUDA_GRAPHS, "on")]);
        assert!(s.fused_attention && s.fused_epilogues && s.cuda_graphs);
        assert_eq!((s.conv, s.flash_warps), (ConvChoice::Im2col, Some(4)));
        assert_eq!(from(&[(FLASH_WARPS, "AUTO"), (CONV, "Auto")]), Switches::default());
        let s = from(&[(GROUP_NORM, " Two-Pass ")]);
        assert!(s.fused_group_norm && s.group_norm_two_pass);
        assert!(!from(&[(GROUP_NORM, "fused")]).group_norm_two_pass);
    }

    #[test]
    fn unknown_values_keep_the_defaults() {
        let s = from(&[
            (ATTENTION, "no"),
            (GROUP_NORM, "0"),
            (FUSED, "false"),
            (CONV, "winograd"),
            (CUDA_GRAPHS, ""),
            (FLASH_WARPS, "16"),
            (VAE_STREAM, "1"),
            (CHANNELS_LAST, "nhwc"),
            (FF_CHUNK, "chunked"),
            (UPSAMPLE, "bilinear"),
            (EAGER_TRIM, "no"),
        ]);
        assert_eq!(s, Switches::default());
    }

    #[test]
    fn conv_plans_off_empty_or_a_path() {
        for off in ["off", " OFF ", "Off\n", "", "  "] {
            assert_eq!(from(&[(CONV_PLANS, off)]).conv_plans, ConvPlans::Off, "{off:?}");
        }
        assert_eq!(from(&[(CONV_PLANS, "./off")]).conv_plans, ConvPlans::File(PathBuf::from("./off")));
        assert_eq!(from(&[(CONV_PLANS, "plans.txt")]).conv_plans, ConvPlans::File(PathBuf::from("plans.txt")));
        assert_eq!(from(&[]).conv_plans, ConvPlans::CacheDir);
    }
}
