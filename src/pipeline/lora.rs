//! LoRA weights fused into the UNet and the CLIP text encoder when they are loaded.
//!
//! Each LoRA layer adds a low-rank delta to one weight of the base model:
//! `W' = W + scale * (alpha / rank) * up @ down`, with `down` (`lora_A`) `[rank, in]` or
//! `[rank, in, kh, kw]` and `up` (`lora_B`) `[out, rank]` or `[out, rank, 1, 1]`, the product
//! reshaped to `W`'s shape (peft's `get_delta_weight` for `Linear` and `Conv2d`, which diffusers'
//! `fuse_lora(lora_scale=scale)` adds to the weight). The sum is computed in f32 on the model's
//! device and cast to the model's dtype afterwards. Several files add their deltas in turn,
//! each with its own `scale`.
//!
//! `alpha / rank`, per layer:
//! - kohya layout (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`): the
//!   layer's `.alpha`, or the rank when it has none (scale 1). This is kohya's own rule; diffusers
//!   gives the same result when all layers share one alpha (the usual case, e.g. the published
//!   LCM-LoRA), but with differing alphas it applies the most common one to attention layers
//!   (its alpha names for them do not match the modules).
//! - diffusers/PEFT layout (`unet.<module>.lora_A.weight` / `.lora_B.weight`, or
//!   `.lora.down.weight` / `.lora.up.weight`): files carry no alpha tensors. With diffusers'
//!   adapter metadata (the `lora_adapter_metadata` entry of the safetensors header, holding the
//!   peft `LoraConfig` of each component under `unet.` / `text_encoder.`), alpha is the
//!   config's `alpha_pattern` entry matching the module (peft's rule: the pattern matches the
//!   module name or a `.`-separated suffix of it), else its `lora_alpha` (peft's default 8 when
//!   missing); `use_rslora` divides by `sqrt(rank)` instead of `rank`. Without metadata alpha
//!   is the rank (scale 1), as diffusers does.
//!
//! Module names: diffusers/PEFT keys name the module directly. Kohya keys replace every `.`
//! of the module path with `_`, which is ambiguous (`to_out_0` vs `to_out.0`), so they are
//! mapped by matching against the loaded component's own weight names with their dots
//! replaced the same way, never by guessing. Text-encoder module paths match with or without
//! the `text_model.` prefix (transformers 4 writes it, transformers 5 does not). LoRAs for the
//! original (LDM/SGM) UNet layout (`lora_unet_input_blocks_*`), SDXL's second text encoder,
//! DoRA, LoRA biases and other adapter kinds (LoHa, LoKr) are refused with an error that says
//! so. The ControlNet and the VAE get no LoRA (diffusers' SD LoRA loader does not touch them
//! either).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::weights::{self, TensorSource};

/// One LoRA to fuse: a `.safetensors` file, a directory holding one, or a Hugging Face repo id
/// (resolved through the local cache like `model`), and its strength.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub source: String,
    pub scale: f64,
}

/// Pickle-based weight files: refused with a conversion hint.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "ckpt", "pt", "pth"];
/// The file a LoRA repo or directory is expected to hold (diffusers' `save_lora_weights` name);
/// a directory with exactly one other `.safetensors` file works too.
const LORA_FILE_NAME: &str = "pytorch_lora_weights.safetensors";

impl LoraSpec {
    /// Parses `path[:scale]`. The text after the last `:` is the scale when it parses as a
    /// number (`lcm.safetensors:0.8`); otherwise the whole entry is the path (so `a:b/c` is a
    /// path) and the scale is 1. A path that itself ends in `:<number>` cannot be written.
    pub fn parse(entry: &str) -> Result<Self> {
        let entry = entry.trim();
        if entry.is_empty() {
            bail!("empty LoRA entry (expected path[:scale])");
        }
        if let Some((path, scale)) = entry.rsplit_once(':') {
            let scale_text = scale.trim();
            if scale_text.is_empty() {
                bail!("LoRA entry '{entry}' ends with ':' but has no scale (expected path[:scale])");
            }
            if let Ok(value) = scale_text.parse::<f64>() {
                if !value.is_finite() {
                    bail!("LoRA entry '{entry}': scale {scale_text} is not a finite number");
                }
                let path = path.trim();
                if path.is_empty() {
                    bail!("LoRA entry '{entry}' has a scale but no path (expected path[:scale])");
                }
                return Ok(Self { source: path.to_string(), scale: value });
            }
        }
        Ok(Self { source: entry.to_string(), scale: 1.0 })
    }

    /// Parses a comma-separated list of `path[:scale]` entries (the element's `lora`
    /// property); an empty or all-blank string is no LoRA.
    pub fn parse_list(list: &str) -> Result<Vec<Self>> {
        if list.trim().is_empty() {
            return Ok(Vec::new());
        }
        list.split(',')
            .enumerate()
            .map(|(i, entry)| Self::parse(entry).with_context(|| format!("LoRA list entry {} of '{list}'", i + 1)))
            .collect()
    }
}

impl FromStr for LoraSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for LoraSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.scale)
    }
}

/// Finds the `.safetensors` file a LoRA source names.
pub fn resolve_lora_file(source: &str) -> Result<PathBuf> {
    let path = Path::new(source);
    if path.is_file() {
        refuse_pickle(path)?;
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        return lora_file_in_dir(path);
    }
    if path.extension().is_some() || !weights::looks_like_repo_id(source) {
        bail!("LoRA file {source} does not exist (and it is not a Hugging Face repo id like owner/name)");
    }
    let snapshot = weights::resolve_model(source, &[&[LORA_FILE_NAME]])
        .with_context(|| format!("cannot find LoRA repo {source} (a LoRA repo must hold {LORA_FILE_NAME})"))?;
    lora_file_in_dir(&snapshot)
}

fn refuse_pickle(path: &Path) -> Result<()> {
    let is_pickle = path.extension().is_some_and(|ext| PICKLE_EXTENSIONS.iter().any(|p| ext.eq_ignore_ascii_case(p)));
    if is_pickle {
        bail!(
            "LoRA file {} is a PyTorch pickle; sdcrossframe reads LoRAs only as safetensors: convert it, e.g. \
             `python -c \"import torch, safetensors.torch as st; sd = torch.load('{0}', map_location='cpu', weights_only=True); \
             st.save_file({{k: v.contiguous() for k, v in sd.get('state_dict', sd).items()}}, 'lora.safetensors')\"`",
            path.display()
        );
    }
    Ok(())
}

fn lora_file_in_dir(dir: &Path) -> Result<PathBuf> {
    let preferred = dir.join(LORA_FILE_NAME);
    if preferred.is_file() {
        return Ok(preferred);
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot list LoRA directory {}", dir.display()))?;
    let mut safetensors = Vec::new();
    let mut pickles = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => safetensors.push(path),
            Some(ext) if PICKLE_EXTENSIONS.contains(&ext) => pickles.push(path),
            _ => {}
        }
    }
    safetensors.sort();
    match (safetensors.len(), pickles.first()) {
        (1, _) => Ok(safetensors.remove(0)),
        (0, Some(pickle)) => refuse_pickle(pickle).map(|()| pickle.clone()),
        (0, None) => bail!("LoRA directory {} holds no .safetensors file", dir.display()),
        _ => bail!(
            "LoRA directory {} holds several .safetensors files ({}) and no {LORA_FILE_NAME}: name the file",
            dir.display(),
            safetensors
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The components a LoRA can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LoraTarget {
    Unet,
    TextEncoder,
}

impl LoraTarget {
    fn describe(self) -> &'static str {
        match self {
            Self::Unet => "UNet",
            Self::TextEncoder => "text encoder",
        }
    }
}

/// How a layer names its module.
#[derive(Debug, Clone)]
enum ModuleName {
    /// diffusers/PEFT: the module path itself.
    Path(String),
    /// kohya: the module path with every `.` replaced by `_`.
    Flattened(String),
}

/// One layer of a LoRA file, not yet matched to a module.
#[derive(Debug)]
struct LoraLayer {
    target: LoraTarget,
    module: ModuleName,
    /// The file's key of the down (A) tensor, for errors.
    key: String,
    /// f32, on the CPU.
    down: Tensor,
    up: Tensor,
    /// alpha / rank (or alpha / sqrt(rank)) for this layer.
    alpha_scale: f64,
}

/// A parsed LoRA file with its user scale.
#[derive(Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    pub scale: f64,
    layers: Vec<LoraLayer>,
}

/// The LoRA files of a model, parsed once, applied to each component as it is loaded.
#[derive(Debug, Default)]
pub struct LoraSet {
    pub files: Vec<LoraFile>,
}

impl LoraSet {
    /// Resolves and parses every LoRA `specs` lists.
    pub fn load(specs: &[LoraSpec]) -> Result<Self> {
        let files = specs
            .iter()
            .map(|spec| {
                let path = resolve_lora_file(&spec.source)?;
                LoraFile::load(&path, spec.scale)
            })
            .collect::<Result<_>>()?;
        Ok(Self { files })
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Whether any file has layers for `target`.
    pub fn touches(&self, target: LoraTarget) -> bool {
        self.files.iter().any(|f| f.layers.iter().any(|l| l.target == target))
    }

    /// A VarBuilder over the component's safetensors `files` that returns each weight a LoRA
    /// changes with its deltas added (the others as stored). Every layer for `target` must
    /// match a weight of the component with fitting shapes.
    pub fn var_builder(
        &self,
        target: LoraTarget,
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        if !self.touches(target) {
            return weights::var_builder(files, dtype, device);
        }
        self.var_builder_over(target, Box::new(weights::SafetensorsFiles::open(files)?), dtype, device)
    }

    /// As [`Self::var_builder`], over any tensor source (a single-file checkpoint's model under
    /// its diffusers names).
    pub fn var_builder_over(
        &self,
        target: LoraTarget,
        base: Box<dyn TensorSource>,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        let _span = tracing::info_span!("fuse_lora", component = target.describe()).entered();
        let modules = ModuleIndex::new(base.as_ref(), target);
        let mut deltas: HashMap<String, Vec<Delta>> = HashMap::new();
        for file in &self.files {
            let mut count = 0;
            for layer in file.layers.iter().filter(|l| l.target == target) {
                let (weight, base_shape) = modules.find(layer).with_context(|| {
                    format!(
                        "LoRA file {}: key {} matches no {} module",
                        file.path.display(),
                        layer.key,
                        target.describe()
                    )
                })?;
                let (down, up) = fit_shapes(layer, base_shape).with_context(|| {
                    format!(
                        "LoRA file {}: key {} does not fit the {} weight {weight} (is the LoRA for another base model?)",
                        file.path.display(),
                        layer.key,
                        target.describe()
                    )
                })?;
                deltas.entry(weight.clone()).or_default().push(Delta {
                    down,
                    up,
                    scale: file.scale * layer.alpha_scale,
                });
                count += 1;
            }
            tracing::info!(file = %file.path.display(), scale = file.scale, layers = count, "LoRA fused into the {}", target.describe());
        }
        let origin = format!(
            "{} with LoRA {}",
            base.describe(),
            self.files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>().join(", ")
        );
        let backend = FusedSafetensors { base, deltas, fused: Mutex::new(HashSet::new()) };
        Ok(weights::FiniteWeights::var_builder(backend, origin, dtype, device))
    }
}

/// One low-rank update of a weight: `scale * up @ down`, reshaped to the weight.
struct Delta {
    /// `[rank, in * kh * kw]`, f32 on the CPU.
    down: Tensor,
    /// `[out, rank]`, f32 on the CPU.
    up: Tensor,
    scale: f64,
}

/// The component's safetensors with LoRA deltas added to the weights they change.
struct FusedSafetensors {
    base: Box<dyn TensorSource>,
    /// Keyed by the weight's tensor name (`<module>.weight`).
    deltas: HashMap<String, Vec<Delta>>,
    /// The changed weights the model asked for (the others are reported when it is dropped).
    fused: Mutex<HashSet<String>>,
}

impl FusedSafetensors {
    fn fused(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let base = self.base.load(name, dev)?;
        let Some(deltas) = self.deltas.get(name) else {
            return base.to_dtype(dtype);
        };
        self.fused.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
        let mut weight = base.to_dtype(DType::F32)?;
        for delta in deltas {
            let product = delta.up.to_device(dev)?.matmul(&delta.down.to_device(dev)?)?;
            let product = (product.reshape(weight.shape())? * delta.scale)?;
            weight = (weight + product)?;
        }
        weight.to_dtype(dtype)
    }
}

impl Drop for FusedSafetensors {
    fn drop(&mut self) {
        let fused = self.fused.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut unused: Vec<&String> = self.deltas.keys().filter(|name| !fused.contains(*name)).collect();
        if !unused.is_empty() {
            unused.sort();
            tracing::warn!(
                "the model never loaded {} weight(s) a LoRA changes, so those LoRA layers have no effect: {}",
                unused.len(),
                unused.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
    }
}

impl SimpleBackend for FusedSafetensors {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.fused(name, dtype, dev)?;
        if tensor.shape() != &s {
            Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt())?
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fused(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains(name)
    }
}

/// The LoRA-able weights of a component (2-d linear and 4-d convolution weights), by module
/// path and by kohya's flattened name.
struct ModuleIndex {
    /// Module path (also with/without `text_model.` for the text encoder) -> (tensor name, shape).
    paths: HashMap<String, (String, Vec<usize>)>,
    /// Flattened module path -> the tensor names it can stand for.
    flattened: HashMap<String, Vec<String>>,
}

impl ModuleIndex {
    fn new(base: &dyn TensorSource, target: LoraTarget) -> Self {
        let mut paths = HashMap::new();
        let mut flattened: HashMap<String, Vec<String>> = HashMap::new();
        for (name, shape) in base.shapes() {
            let Some(module) = name.strip_suffix(".weight") else { continue };
            if shape.len() != 2 && shape.len() != 4 {
                continue;
            }
            let mut aliases = vec![module.to_string()];
            if target == LoraTarget::TextEncoder {
                match module.strip_prefix("text_model.") {
                    Some(short) => aliases.push(short.to_string()),
                    None => aliases.push(format!("text_model.{module}")),
                }
            }
            for alias in aliases {
                let flat = alias.replace('.', "_");
                let names = flattened.entry(flat).or_default();
                if !names.contains(&name) {
                    names.push(name.clone());
                }
                paths.insert(alias, (name.clone(), shape.clone()));
            }
        }
        Self { paths, flattened }
    }

    /// The weight a layer changes and its shape.
    fn find(&self, layer: &LoraLayer) -> Result<(&String, &[usize])> {
        match &layer.module {
            ModuleName::Path(path) => match self.paths.get(path) {
                Some((name, shape)) => Ok((name, shape)),
                None => bail!("the component has no weight {path}.weight"),
            },
            ModuleName::Flattened(flat) => match self.flattened.get(flat).map(Vec::as_slice) {
                Some([name]) => {
                    let (name, shape) = &self.paths[name.strip_suffix(".weight").expect("indexed weights end so")];
                    Ok((name, shape))
                }
                Some(several) if !several.is_empty() => {
                    bail!("{flat} could be any of {}", several.join(", "))
                }
                _ => bail!("the component has no weight whose module path, with '.' written as '_', is {flat}"),
            },
        }
    }
}

/// Checks `down` / `up` against the base weight's shape and flattens them to 2-d:
/// down `[r, in]` or `[r, in, kh, kw]` (also `[r, in]` for a 1x1 convolution, `[r, in, 1, 1]`
/// for a linear layer), up `[out, r]` or `[out, r, 1, 1]`.
fn fit_shapes(layer: &LoraLayer, base: &[usize]) -> Result<(Tensor, Tensor)> {
    let down = layer.down.dims();
    let up = layer.up.dims();
    let mismatch = || {
        anyhow::anyhow!(
            "LoRA down {:?} and up {:?} against weight {:?} (expected down [rank, {}], up [{}, rank])",
            down,
            up,
            base,
            base[1..].iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
            base[0]
        )
    };
    if down.len() < 2 || up.len() < 2 {
        return Err(mismatch());
    }
    let rank = down[0];
    let in_ok = trailing_ones_trimmed(&down[1..]) == trailing_ones_trimmed(&base[1..]);
    let up_ok = up[0] == base[0] && up[1] == rank && up[2..].iter().all(|&d| d == 1);
    if !in_ok || !up_ok || rank == 0 {
        return Err(mismatch());
    }
    let inner: usize = base[1..].iter().product();
    let down = layer.down.reshape((rank, inner))?;
    let up = layer.up.reshape((base[0], rank))?;
    Ok((down, up))
}

/// `dims` without trailing 1s (keeping the first): `[in, 1, 1]` and `[in]` compare equal.
fn trailing_ones_trimmed(dims: &[usize]) -> &[usize] {
    let mut n = dims.len();
    while n > 1 && dims[n - 1] == 1 {
        n -= 1;
    }
    &dims[..n]
}

/// diffusers' adapter metadata (`lora_adapter_metadata`): the peft LoraConfig of a component.
#[derive(Debug, Default)]
struct AdapterConfig {
    lora_alpha: f64,
    alpha_pattern: Vec<(regex::Regex, String, f64)>,
    use_rslora: bool,
}

impl AdapterConfig {
    /// The config stored under `prefix.` (e.g. `unet.`), if the metadata has one.
    fn from_metadata(
        meta: &serde_json::Map<String, serde_json::Value>,
        prefix: &str,
        path: &Path,
    ) -> Result<Option<Self>> {
        let get = |name: &str| meta.get(&format!("{prefix}.{name}"));
        if !meta.keys().any(|k| k.starts_with(&format!("{prefix}."))) {
            return Ok(None);
        }
        if get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            bail!("LoRA file {}: its {prefix} adapter is DoRA (use_dora), which is not supported", path.display());
        }
        // peft's LoraConfig default when the metadata leaves it out.
        let lora_alpha = match get("lora_alpha") {
            None | Some(serde_json::Value::Null) => 8.0,
            Some(v) => v.as_f64().with_context(|| {
                format!("LoRA file {}: metadata {prefix}.lora_alpha is {v}, not a number", path.display())
            })?,
        };
        let mut alpha_pattern = Vec::new();
        if let Some(patterns) = get("alpha_pattern").and_then(|v| v.as_object()) {
            for (pattern, value) in patterns {
                let alpha = value.as_f64().with_context(|| {
                    format!(
                        "LoRA file {}: metadata {prefix}.alpha_pattern[{pattern}] is {value}, not a number",
                        path.display()
                    )
                })?;
                // peft's get_pattern_key: re.match(rf"(.*\.)?({key})$", module).
                let regex = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).with_context(|| {
                    format!(
                        "LoRA file {}: metadata {prefix}.alpha_pattern key {pattern} is not a valid pattern",
                        path.display()
                    )
                })?;
                alpha_pattern.push((regex, pattern.clone(), alpha));
            }
        }
        let use_rslora = get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
        Ok(Some(Self { lora_alpha, alpha_pattern, use_rslora }))
    }

    fn alpha_scale(&self, module: &str, rank: usize) -> f64 {
        let alpha = self.alpha_pattern.iter().find(|(re, _, _)| re.is_match(module)).map_or(self.lora_alpha, |p| p.2);
        if self.use_rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 }
    }
}

/// Which part of a layer a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// A layer's tensors while the file is read.
#[derive(Default)]
struct PendingLayer {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

/// The layer a key belongs to: (target, module name, part), or an error saying why the key
/// cannot be used.
fn classify(key: &str) -> Result<(LoraTarget, ModuleName, Part)> {
    if let Some(rest) = key.strip_prefix("lora_unet_") {
        let (name, part) = kohya_part(key, rest)?;
        if ["input_blocks_", "middle_block_", "output_blocks_"].iter().any(|p| name.starts_with(p)) {
            bail!(
                "it is in the original Stable Diffusion (LDM/SGM) UNet layout (input_blocks/middle_block/output_blocks), \
                 which is not supported: convert the LoRA to the diffusers or kohya-diffusers layout \
                 (down_blocks/mid_block/up_blocks)"
            );
        }
        return Ok((LoraTarget::Unet, ModuleName::Flattened(name.to_string()), part));
    }
    for prefix in ["lora_te_", "lora_te1_"] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (name, part) = kohya_part(key, rest)?;
            return Ok((LoraTarget::TextEncoder, ModuleName::Flattened(name.to_string()), part));
        }
    }
    if key.starts_with("lora_te2_") || key.starts_with("text_encoder_2.") {
        bail!("it is for SDXL's second text encoder; this is an SDXL LoRA, not one for Stable Diffusion 1.5");
    }
    for (prefix, target) in [("unet.", LoraTarget::Unet), ("text_encoder.", LoraTarget::TextEncoder)] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (module, part) = diffusers_part(rest)?;
            return Ok((target, ModuleName::Path(module), part));
        }
    }
    bail!(
        "it is not a LoRA key of a known layout (kohya lora_unet_* / lora_te_*, or diffusers/PEFT unet.* / text_encoder.*)"
    )
}

fn kohya_part<'a>(key: &str, rest: &'a str) -> Result<(&'a str, Part)> {
    let Some((name, suffix)) = rest.split_once('.') else {
        bail!("a kohya LoRA key needs a suffix (.lora_down.weight, .lora_up.weight or .alpha)");
    };
    let part = match suffix {
        "lora_down.weight" => Part::Down,
        "lora_up.weight" => Part::Up,
        "alpha" => Part::Alpha,
        "dora_scale" => bail!("DoRA LoRAs (dora_scale) are not supported"),
        s if s.starts_with("hada_") || s.starts_with("lokr_") => {
            bail!("{key} belongs to a LyCORIS adapter (LoHa/LoKr), which is not supported: only LoRA is")
        }
        other => bail!("unknown kohya LoRA tensor .{other} (expected .lora_down.weight, .lora_up.weight or .alpha)"),
    };
    Ok((name, part))
}

/// Splits a diffusers/PEFT key (without its `unet.`/`text_encoder.` prefix) into the module
/// path and the part, accepting the older diffusers spellings
/// (`.lora.down.weight`, `.lora_linear_layer.down.weight`, `.processor.to_q_lora.down.weight`).
fn diffusers_part(rest: &str) -> Result<(String, Part)> {
    const SUFFIXES: &[(&str, Part)] = &[
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
    ];
    for (suffix, part) in SUFFIXES {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Ok((module.to_string(), *part));
        }
    }
    // diffusers' attention-processor format: `<attn>.processor.to_q_lora.down.weight`.
    for (proc, module_suffix) in
        [("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"), ("to_out_lora", "to_out.0")]
    {
        for (part_name, part) in [("down", Part::Down), ("up", Part::Up)] {
            if let Some(attn) = rest.strip_suffix(&format!(".{proc}.{part_name}.weight")) {
                let attn = attn.strip_suffix(".processor").unwrap_or(attn);
                return Ok((format!("{attn}.{module_suffix}"), part));
            }
        }
    }
    if rest.contains("lora_magnitude_vector") {
        bail!("DoRA LoRAs (lora_magnitude_vector) are not supported");
    }
    if rest.ends_with(".lora_B.bias") {
        bail!("LoRA biases (lora_B.bias) are not supported");
    }
    if rest.ends_with(".alpha") {
        bail!("a diffusers/PEFT-layout LoRA carries no .alpha tensors (diffusers refuses them too)");
    }
    bail!(
        "unknown LoRA tensor (expected <module>.lora_A.weight / .lora_B.weight or .lora.down.weight / .lora.up.weight)"
    )
}

/// The safetensors header's `__metadata__` entries.
fn read_metadata(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open LoRA file {}", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_context(|| format!("cannot read LoRA file {}", path.display()))?;
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    file.read_exact(&mut header).with_context(|| format!("cannot read the header of LoRA file {}", path.display()))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("LoRA file {} has a corrupt safetensors header", path.display()))?;
    Ok(match header.get("__metadata__") {
        Some(serde_json::Value::Object(meta)) => meta.clone(),
        _ => serde_json::Map::new(),
    })
}

/// diffusers' adapter metadata of a file, parsed (an empty map when absent).
fn adapter_metadata(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let meta = read_metadata(path)?;
    let Some(raw) = meta.get("lora_adapter_metadata") else { return Ok(serde_json::Map::new()) };
    let text = raw.as_str().unwrap_or_default();
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        _ => bail!("LoRA file {}: its lora_adapter_metadata is not a JSON object", path.display()),
    }
}

impl LoraFile {
    /// Reads and checks a LoRA file: every key must belong to a known layout, every layer needs
    /// its down and up tensors, and the file must change the UNet.
    pub fn load(path: &Path, scale: f64) -> Result<Self> {
        let _span = tracing::info_span!("load_lora", file = %path.display()).entered();
        refuse_pickle(path)?;
        if !path.is_file() {
            bail!("LoRA file {} does not exist", path.display());
        }
        weights::validate_safetensors(path)?;
        let meta = adapter_metadata(path)?;
        let configs = [
            (LoraTarget::Unet, AdapterConfig::from_metadata(&meta, "unet", path)?),
            (LoraTarget::TextEncoder, AdapterConfig::from_metadata(&meta, "text_encoder", path)?),
        ];
        // SAFETY: read-only map of a file not modified while it is read.
        let tensors = unsafe { MmapedSafetensors::new(path) }
            .with_context(|| format!("cannot read LoRA file {}", path.display()))?;
        let mut pending: BTreeMap<(LoraTarget, String), (ModuleName, PendingLayer)> = BTreeMap::new();
        let mut names: Vec<String> = tensors.tensors().into_iter().map(|(name, _)| name).collect();
        names.sort();
        if names.is_empty() {
            bail!("LoRA file {} holds no tensors", path.display());
        }
        for key in &names {
            let (target, module, part) =
                classify(key).with_context(|| format!("LoRA file {}: cannot use key {key}", path.display()))?;
            let module_key = match &module {
                ModuleName::Path(p) | ModuleName::Flattened(p) => p.clone(),
            };
            let slot = pending.entry((target, module_key)).or_insert_with(|| (module, PendingLayer::default()));
            let field = match part {
                Part::Down => &mut slot.1.down,
                Part::Up => &mut slot.1.up,
                Part::Alpha => &mut slot.1.alpha,
            };
            if let Some(previous) = field.replace(key.clone()) {
                bail!("LoRA file {}: keys {previous} and {key} are the same tensor of one layer", path.display());
            }
        }
        let load = |key: &str| -> Result<Tensor> {
            tensors
                .load(key, &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .with_context(|| format!("LoRA file {}: cannot read tensor {key}", path.display()))
        };
        let mut layers = Vec::new();
        for ((target, _), (module, parts)) in pending {
            let (Some(down_key), Some(up_key)) = (&parts.down, &parts.up) else {
                let present =
                    parts.down.as_ref().or(parts.up.as_ref()).or(parts.alpha.as_ref()).expect("a key made the entry");
                bail!(
                    "LoRA file {}: key {present} has no matching {} tensor",
                    path.display(),
                    if parts.down.is_none() { "down (lora_A / lora_down)" } else { "up (lora_B / lora_up)" }
                );
            };
            let down = load(down_key)?;
            let up = load(up_key)?;
            let rank = down.dims().first().copied().unwrap_or(0);
            if rank == 0 {
                bail!("LoRA file {}: key {down_key} has shape {:?}, not [rank, ...]", path.display(), down.dims());
            }
            let alpha_scale = match (&parts.alpha, &module) {
                (Some(alpha_key), _) => {
                    let alpha = load(alpha_key)?;
                    if alpha.elem_count() != 1 {
                        bail!(
                            "LoRA file {}: key {alpha_key} has shape {:?}, not a scalar",
                            path.display(),
                            alpha.dims()
                        );
                    }
                    let alpha = alpha.flatten_all()?.to_vec1::<f32>()?[0] as f64;
                    alpha / rank as f64
                }
                (None, ModuleName::Flattened(_)) => 1.0,
                (None, ModuleName::Path(module)) => {
                    let config = configs.iter().find(|(t, _)| *t == target).and_then(|(_, c)| c.as_ref());
                    config.map_or(1.0, |c| c.alpha_scale(module, rank))
                }
            };
            layers.push(LoraLayer { target, module, key: down_key.clone(), down, up, alpha_scale });
        }
        if !layers.iter().any(|l| l.target == LoraTarget::Unet) {
            bail!(
                "LoRA file {} has no UNet layers (no lora_unet_* or unet.* keys); sdcrossframe needs a LoRA for the \
                 Stable Diffusion UNet",
                path.display()
            );
        }
        Ok(Self { path: path.to_path_buf(), scale, layers })
    }
}
