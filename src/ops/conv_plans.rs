//! The convolution tuner's plan files ([`super::conv`], `cudnn` feature): where they live, what
//! they are called and how one is read. The tuner's choices are only valid for the GPU, driver
//! and cuDNN that timed them, so the default file (`SDCROSSFRAME_CONV_PLANS` unset) is one per
//! GPU model, driver and cuDNN version in the per-user cache directory, e.g.
//! `~/.cache/sdcrossframe/conv-plans-NVIDIA-H200-driver12080-cudnn91000.txt`. Each line is one
//! shape and the method chosen for it: `F16 2x320x64x64 320x320x3x3 p1 s1 im2col`.
//!
//! Everything here is plain text and paths, so the CPU tests check it; the cuDNN module asks
//! the device for its name and versions and does the reading and appending.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The folder of the plan files inside the per-user cache directory.
pub const CACHE_SUBDIR: &str = "sdcrossframe";

/// Lines reported one by one when a file has unreadable lines; the rest are counted.
const REPORTED_BAD_LINES: usize = 5;

/// The per-user cache directory of the plan files, as `lookup` (a variable name to its value)
/// gives the environment: `$XDG_CACHE_HOME/sdcrossframe` when that is an absolute path (the XDG
/// rule: a relative one is ignored), else `$HOME/.cache/sdcrossframe`; `None` when neither is set.
pub fn cache_dir(lookup: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name: &str| lookup(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(xdg) = set("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return Some(xdg.join(CACHE_SUBDIR));
    }
    set("HOME").map(|home| home.join(".cache").join(CACHE_SUBDIR))
}

/// The plan file's name for a GPU model (`cuDeviceGetName`), CUDA driver version
/// (`cuDriverGetVersion`, e.g. 12080 for 12.8) and cuDNN version (`cudnnGetVersion`, e.g.
/// 91000 for 9.10.0). `cudnn_only` (`SDCROSSFRAME_CONV=cudnn`) names a file of its own, since
/// its choices leave im2col out.
pub fn file_name(device_name: &str, driver_version: i32, cudnn_version: usize, cudnn_only: bool) -> String {
    let only = if cudnn_only { "-cudnn-only" } else { "" };
    format!("conv-plans{only}-{}-driver{driver_version}-cudnn{cudnn_version}.txt", sanitize(device_name))
}

/// ASCII letters, digits, `.` and `_` kept, every other run of characters one `-`, none at
/// either end; `unknown-gpu` when nothing is left.
fn sanitize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-');
    if out.is_empty() { "unknown-gpu".into() } else { out.into() }
}

/// The shape part of a line: dtype (candle's `Debug` name), input and filter dimensions,
/// padding and stride, e.g. `F16 2x320x64x64 320x320x3x3 p1 s1`.
pub fn shape_line(dtype: &str, input: [usize; 4], filter: [usize; 4], padding: usize, stride: usize) -> String {
    let dims = |d: [usize; 4]| d.map(|v| v.to_string()).join("x");
    format!("{dtype} {} {} p{padding} s{stride}", dims(input), dims(filter))
}

/// Whether `shape` is what [`shape_line`] writes.
fn is_shape_line(shape: &str) -> bool {
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let dims = |s: &str| {
        let parts: Vec<&str> = s.split('x').collect();
        parts.len() == 4 && parts.iter().all(|p| number(p))
    };
    let fields: Vec<&str> = shape.split(' ').collect();
    let &[dtype, input, filter, padding, stride] = fields.as_slice() else { return false };
    !dtype.is_empty()
        && dtype.bytes().all(|b| b.is_ascii_alphanumeric())
        && dims(input)
        && dims(filter)
        && padding.strip_prefix('p').is_some_and(number)
        && stride.strip_prefix('s').is_some_and(number)
}

/// One whole line of a plan file, newline included, written with one `write` call so that
/// processes appending to the same file at once do not interleave their lines.
pub fn plan_line(shape: &str, method: &str) -> String {
    format!("{shape} {method}\n")
}

/// The plans in a file's bytes, shape line to method. Blank lines are skipped; a line that is
/// not UTF-8, not `SHAPE METHOD` or names a method `parse_method` does not know (a torn or
/// edited line, a file of another version) is skipped with a warning naming `path` and the
/// line number. A later line for the same shape wins.
pub fn parse<M>(bytes: &[u8], path: &Path, parse_method: impl Fn(&str) -> Option<M>) -> HashMap<String, M> {
    let mut plans = HashMap::new();
    let mut bad = 0;
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let parsed = std::str::from_utf8(raw).ok().map(str::trim).and_then(|line| {
            if line.is_empty() {
                return Some(None);
            }
            let (shape, method) = line.rsplit_once(' ')?;
            let method = parse_method(method).filter(|_| is_shape_line(shape))?;
            Some(Some((shape.to_string(), method)))
        });
        match parsed {
            Some(Some((shape, method))) => {
                plans.insert(shape, method);
            }
            Some(None) => {}
            None => {
                bad += 1;
                if bad <= REPORTED_BAD_LINES {
                    let text = String::from_utf8_lossy(raw);
                    tracing::warn!(
                        "convolution plans {} line {}: cannot read {:?}: skipped",
                        path.display(),
                        index + 1,
                        text.chars().take(120).collect::<String>()
                    );
                }
            }
        }
    }
    if bad > REPORTED_BAD_LINES {
        tracing::warn!(
            "convolution plans {}: {} more unreadable lines skipped",
            path.display(),
            bad - REPORTED_BAD_LINES
        );
    }
    plans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn cache_dir_prefers_an_absolute_xdg_cache_home() {
        let dir = |vars: &[(&str, &str)]| cache_dir(env(vars));
        assert_eq!(dir(&[("XDG_CACHE_HOME", "/xdg"), ("HOME", "/home/u")]), Some(PathBuf::from("/xdg/sdcrossframe")));
        assert_eq!(dir(&[("HOME", "/home/u")]), Some(PathBuf::from("/home/u/.cache/sdcrossframe")));
        // Empty or relative XDG_CACHE_HOME is ignored (XDG base directory rules).
        assert_eq!(dir(&[("XDG_CACHE_HOME", ""), ("HOME", "/h")]), Some(PathBuf::from("/h/.cache/sdcrossframe")));
        assert_eq!(dir(&[("XDG_CACHE_HOME", "rel"), ("HOME", "/h")]), Some(PathBuf::from("/h/.cache/sdcrossframe")));
        assert_eq!(dir(&[("XDG_CACHE_HOME", "rel")]), None);
        assert_eq!(dir(&[("HOME", "")]), None);
        assert_eq!(dir(&[]), None);
    }

    #[test]
    fn file_name_has_the_model_driver_and_cudnn() {
        assert_eq!(file_name("NVIDIA H200", 12080, 91000, false), "conv-plans-NVIDIA-H200-driver12080-cudnn91000.txt");
        assert_eq!(
            file_name("NVIDIA H100 80GB HBM3", 12040, 90100, true),
            "conv-plans-cudnn-only-NVIDIA-H100-80GB-HBM3-driver12040-cudnn90100.txt"
        );
        assert_eq!(
            file_name(" NVIDIA GeForce RTX 4090/..\\x: ", 12020, 8906, false),
            "conv-plans-NVIDIA-GeForce-RTX-4090-..-x-driver12020-cudnn8906.txt"
        );
        assert_eq!(file_name("", 1, 2, false), "conv-plans-unknown-gpu-driver1-cudnn2.txt");
        assert_eq!(file_name("Grafikkarte äöü", 1, 2, false), "conv-plans-Grafikkarte-driver1-cudnn2.txt");
        // Nothing that leaves the directory.
        for name in ["../../etc/passwd", "/", "a/b\\c\0d"] {
            let file = file_name(name, 1, 2, false);
            assert!(!file.contains('/') && !file.contains('\\') && !file.contains('\0'), "{file}");
        }
    }

    fn method(name: &str) -> Option<u8> {
        match name {
            "im2col" => Some(0),
            "CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD" => Some(1),
            _ => None,
        }
    }

    #[test]
    fn shape_lines_read_back() {
        let shape = shape_line("F16", [2, 320, 64, 64], [320, 320, 3, 3], 1, 1);
        assert_eq!(shape, "F16 2x320x64x64 320x320x3x3 p1 s1");
        assert!(is_shape_line(&shape));
        let text =
            plan_line(&shape, "im2col") + &plan_line(&shape_line("BF16", [1, 4, 8, 8], [8, 4, 3, 3], 0, 2), "im2col");
        let plans = parse(text.as_bytes(), Path::new("p.txt"), method);
        assert_eq!(plans.len(), 2);
        assert_eq!(plans.get(&shape), Some(&0));
        assert_eq!(plans.get("BF16 1x4x8x8 8x4x3x3 p0 s2"), Some(&0));
    }

    #[test]
    fn bad_lines_are_skipped_and_later_lines_win() {
        let good = "F16 2x320x64x64 320x320x3x3 p1 s1";
        let text = [
            format!("{good} im2col"),
            String::new(),
            "F16 2x320x64x64 320x320x3x3 p1 s1 NO_SUCH_ALGO".into(),
            "F16 2x320x64 im2col".into(),
            "F16 2x320x64x64 320x320x3x3 p1".into(),
            "garbage".into(),
            "F16 2x3F16 2x320x64x64 320x320x3x3 p1 s1 im2col".into(),
            "F16 1x4x8x8 8x4x3x3 p1 s1 CUDNN_CONVOLUTION_FWD_ALG".into(),
            "F16 1x4x8x8 8x4x3x3 px s1 im2col".into(),
            format!("{good} CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD\r"),
            "  ".into(),
        ]
        .join("\n");
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(b"\nF16 1x4x8x8 8x4x3x3 p1 s1 \xff\xfe\n");
        let plans = parse(&bytes, Path::new("p.txt"), method);
        assert_eq!(plans, HashMap::from([(good.to_string(), 1)]));
        assert!(parse(b"", Path::new("p.txt"), method).is_empty());
        assert!(parse(b"\0\0\0\0", Path::new("p.txt"), method).is_empty());
    }
}
