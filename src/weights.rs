//! Locating and validating diffusers-format model directories and their safetensors files.
//!
//! Every error names the file and the problem, so a user with a half-downloaded or
//! PyTorch-pickle checkpoint knows what to fix.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use serde::de::DeserializeOwned;

/// Named tensors a model's weights are read from: safetensors files as stored, or one model
/// of a single-file checkpoint under its diffusers names ([`crate::single_file::TensorView`]).
/// The LoRA fusion reads its base weights through it.
pub trait TensorSource: Send + Sync {
    /// Every tensor's name and shape.
    fn shapes(&self) -> Vec<(String, Vec<usize>)>;
    /// The tensor `name` in its stored dtype.
    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
    /// Where the tensors come from, for messages.
    fn describe(&self) -> String;
}

/// Memory-mapped safetensors files with their own names.
pub struct SafetensorsFiles {
    pub files: Vec<PathBuf>,
    pub tensors: MmapedSafetensors,
}

impl SafetensorsFiles {
    /// Validates and maps `files`.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        for file in files {
            validate_safetensors(file)?;
        }
        // SAFETY: read-only maps of files nobody modifies while the model loads (as in
        // `var_builder`).
        let tensors = unsafe { MmapedSafetensors::multi(files) }
            .with_context(|| format!("cannot load weights from {}", display_list(files)))?;
        Ok(Self { files: files.to_vec(), tensors })
    }
}

impl TensorSource for SafetensorsFiles {
    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.tensors.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect()
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        self.tensors.load(name, device)
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }

    fn describe(&self) -> String {
        display_list(&self.files)
    }
}

/// The `__metadata__` strings of a safetensors file's header (empty when it has none).
pub fn safetensors_metadata(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    let mut file = File::open(path).with_context(|| format!("cannot open weights file {}", path.display()))?;
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .with_context(|| format!("weights file {} is truncated or not safetensors", path.display()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 {
        bail!("weights file {} is not safetensors: header of {header_len} bytes announced", path.display());
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).with_context(|| format!("cannot read header of {}", path.display()))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .with_context(|| format!("weights file {} has a corrupt safetensors header", path.display()))?;
    let Some(metadata) = header.get("__metadata__").and_then(|m| m.as_object()) else {
        return Ok(Default::default());
    };
    Ok(metadata.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
}

/// Weight file names diffusers and transformers write, in order of preference.
const SAFETENSORS_NAMES: &[&str] = &["diffusion_pytorch_model", "model"];
/// Pickle-based weight files we refuse, with the reason.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "ckpt", "pt", "pth"];

/// Reads and parses a JSON config file, naming the file on error.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// The files making up one model component (`unet/`, `vae/`, a ControlNet directory...).
#[derive(Debug, Clone)]
pub struct ComponentFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
}

impl ComponentFiles {
    /// Finds `config.json` and the safetensors weights in a component directory.
    /// `variant` selects e.g. `diffusion_pytorch_model.fp16.safetensors`; without it the
    /// plain file is preferred and a variant is used only when it is the only one there.
    pub fn locate(dir: &Path, variant: Option<&str>) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model directory {} does not exist", dir.display());
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            bail!("{} is missing (is {} a diffusers-format model directory?)", config.display(), dir.display());
        }
        let weights = find_safetensors(dir, variant)?;
        Ok(Self { dir: dir.to_path_buf(), config, weights })
    }

    pub fn read_config<T: DeserializeOwned>(&self) -> Result<T> {
        read_config(&self.config)
    }

    /// A VarBuilder over the validated weight files, converting to `dtype` on load.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        var_builder(&self.weights, dtype, device)
    }
}

/// Validates each file and memory-maps them into one VarBuilder.
pub fn var_builder(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    for file in files {
        validate_safetensors(file)?;
    }
    // SAFETY: the files are memory-mapped read-only; like every mmap user we rely on them
    // not being truncated while the model is loaded.
    let tensors = unsafe { MmapedSafetensors::multi(files) }
        .with_context(|| format!("cannot load weights from {}", display_list(files)))?;
    Ok(FiniteWeights::var_builder(tensors, display_list(files), dtype, device))
}

/// A VarBuilder backend that refuses weights holding NaN or infinities, naming the tensor and
/// where it comes from. Such weights load without complaint otherwise and make every frame
/// black or NaN at the first frame, with nothing to say which file is at fault: a damaged
/// download, a checkpoint saved from a model that had diverged, or (told apart) f32 values
/// beyond the range of the dtype they are loaded as (an f32 fine-tune loaded as f16). The check
/// is one reduction per tensor on the device it was loaded to, after the dtype conversion
/// (`x * 0` is 0 for every finite x and NaN for NaN and the infinities).
pub struct FiniteWeights<B> {
    inner: B,
    origin: String,
}

impl<B: SimpleBackend + 'static> FiniteWeights<B> {
    /// A VarBuilder over `inner` with the check; `origin` names the files for errors.
    pub fn var_builder(inner: B, origin: String, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Self { inner, origin }), dtype, device.clone())
    }
}

impl<B: SimpleBackend> FiniteWeights<B> {
    fn check(&self, name: &str, tensor: Tensor, dev: &Device) -> candle_core::Result<Tensor> {
        if !tensor.dtype().is_float() || all_finite(&tensor)? {
            return Ok(tensor);
        }
        let dtype = tensor.dtype();
        let overflow = dtype != DType::F32
            && self.inner.get_unchecked(name, DType::F32, dev).and_then(|t| all_finite(&t)).unwrap_or(false);
        let why = if overflow {
            format!(
                "has values beyond the range of {} (they become infinities when loaded so): load the model as f32 \
                 (or bf16 on a GPU)",
                dtype.as_str()
            )
        } else {
            "holds NaN or infinite values: the file is damaged, or was saved from a model whose weights diverged"
                .to_string()
        };
        Err(candle_core::Error::Msg(format!("{}: tensor {name} {why}", self.origin)))
    }
}

impl<B: SimpleBackend> SimpleBackend for FiniteWeights<B> {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.inner.get(s, name, h, dtype, dev)?;
        self.check(name, tensor, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.inner.get_unchecked(name, dtype, dev)?;
        self.check(name, tensor, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Whether every value of a float tensor is finite (one reduction on its device).
pub fn all_finite(tensor: &Tensor) -> candle_core::Result<bool> {
    let probe = tensor.affine(0.0, 0.0)?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    Ok(probe.is_finite())
}

fn display_list(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

fn find_safetensors(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut plain = Vec::new();
    let mut variants = Vec::new();
    for stem in SAFETENSORS_NAMES {
        // Sharded checkpoints list their shards in an index file.
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.is_file() {
            return sharded_files(&index);
        }
        let file = dir.join(format!("{stem}.safetensors"));
        if file.is_file() {
            plain.push(file);
        }
        if let Some(v) = variant {
            let file = dir.join(format!("{stem}.{v}.safetensors"));
            if file.is_file() {
                variants.push(file);
            }
        } else {
            for v in ["fp16", "bf16"] {
                let file = dir.join(format!("{stem}.{v}.safetensors"));
                if file.is_file() {
                    variants.push(file);
                }
            }
        }
    }
    let chosen = match variant {
        Some(_) if !variants.is_empty() => variants.swap_remove(0),
        _ if !plain.is_empty() => plain.swap_remove(0),
        None if !variants.is_empty() => variants.swap_remove(0),
        Some(v) => bail!(
            "no {v} weights in {}: expected diffusion_pytorch_model.{v}.safetensors or model.{v}.safetensors",
            dir.display()
        ),
        None => {
            let pickles = pickle_files(dir);
            if !pickles.is_empty() {
                bail!(
                    "{} holds PyTorch pickle weights ({}); sdcrossframe needs safetensors: \
                     convert them (e.g. diffusers' `from_pretrained(...).save_pretrained(dir, safe_serialization=True)`)",
                    dir.display(),
                    pickles.join(", ")
                );
            }
            bail!("no weights in {}: expected diffusion_pytorch_model.safetensors or model.safetensors", dir.display())
        }
    };
    Ok(vec![chosen])
}

fn pickle_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| Path::new(name).extension().is_some_and(|ext| PICKLE_EXTENSIONS.iter().any(|p| ext == *p)))
        .collect();
    names.sort();
    names
}

fn sharded_files(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let parsed: Index = read_config(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = parsed.weight_map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    for f in &files {
        if !f.is_file() {
            bail!("shard {} listed in {} is missing", f.display(), index.display());
        }
    }
    Ok(files)
}

/// Checks the safetensors header and that the file holds every byte the header promises,
/// so a truncated download is reported as such instead of as a bad tensor later.
pub fn validate_safetensors(path: &Path) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("cannot open weights file {}", path.display()))?;
    let file_len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|_| {
        anyhow::anyhow!("weights file {} is truncated or not safetensors: {file_len} bytes, no header", path.display())
    })?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        bail!(
            "weights file {} is truncated or not safetensors: header of {header_len} bytes announced, file has {file_len}",
            path.display()
        );
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).with_context(|| format!("cannot read header of {}", path.display()))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("weights file {} has a corrupt safetensors header", path.display()))?;
    let data_len = header
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .filter_map(|(_, info)| info.get("data_offsets")?.as_array()?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let available = file_len - 8 - header_len;
    if data_len > available {
        bail!(
            "weights file {} is truncated: its header describes {data_len} bytes of tensor data but only {available} are present",
            path.display()
        );
    }
    Ok(())
}

/// The snapshot directory of `repo_id` in the local Hugging Face cache if it holds one of each
/// of `needed`'s alternatives; never downloads.
pub fn resolve_cached(repo_id: &str, needed: &[&[&str]]) -> Option<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let cached = cache.repo(hf_hub::Repo::model(repo_id.to_string()));
    let mut snapshot = None;
    for alternatives in needed {
        let (file, path) = alternatives.iter().find_map(|file| cached.get(file).map(|p| (*file, p)))?;
        if snapshot.is_none() {
            snapshot = path.ancestors().nth(Path::new(file).components().count()).map(Path::to_path_buf);
        }
    }
    snapshot
}

/// The local Hugging Face cache's directory (for messages).
pub fn cache_dir() -> PathBuf {
    hf_hub::Cache::from_env().path().clone()
}

/// Where a model comes from: a local directory or a Hugging Face repo id.
/// `needed` lists, for each file a repo must provide, the acceptable alternatives
/// (e.g. the plain and fp16 weights); the first one found in the cache or downloadable wins.
pub fn resolve_model(spec: &str, needed: &[&[&str]]) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        if !path.is_dir() {
            bail!("model path {} is a file; expected a diffusers-format model directory", path.display());
        }
        return Ok(path.to_path_buf());
    }
    if !looks_like_repo_id(spec) {
        bail!("model directory {spec} does not exist (and it is not a Hugging Face repo id like owner/name)");
    }
    resolve_repo(spec, needed)
}

/// Whether `spec` has the form of a Hugging Face repo id (`owner/name`).
pub fn looks_like_repo_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    ok(owner) && ok(name) && !spec.starts_with('.')
}

/// Resolves a repo id through the local Hugging Face cache (HF_HOME or ~/.cache/huggingface),
/// downloading missing files unless HF_HUB_OFFLINE is set. Returns the snapshot directory.
fn resolve_repo(repo_id: &str, needed: &[&[&str]]) -> Result<PathBuf> {
    let _span = tracing::info_span!("resolve_repo", repo_id).entered();
    let cache = hf_hub::Cache::from_env();
    let cached = cache.repo(hf_hub::Repo::model(repo_id.to_string()));
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v != "0" && !v.is_empty());
    let mut downloader = Downloader::new(&cache, repo_id);
    let mut snapshot: Option<PathBuf> = None;
    for alternatives in needed {
        let mut found = alternatives.iter().find_map(|file| cached.get(file).map(|p| (*file, p)));
        let mut last_error = None;
        if found.is_none() && !offline {
            match downloader.get_any(alternatives) {
                Ok(hit) => found = Some(hit),
                Err(e) => last_error = Some(format!("{e:#}")),
            }
        }
        let Some((file, path)) = found else {
            let why = match (offline, last_error) {
                (true, _) => "HF_HUB_OFFLINE is set".to_string(),
                (false, Some(e)) => e,
                (false, None) => "downloading failed".to_string(),
            };
            bail!(
                "{repo_id}: {} is not in the Hugging Face cache at {} and {why}",
                alternatives.join(" or "),
                cache.path().display()
            );
        };
        // `file` may contain a subdirectory; the snapshot root is that many levels up.
        let depth = Path::new(file).components().count();
        if snapshot.is_none() {
            snapshot = path.ancestors().nth(depth).map(Path::to_path_buf);
        }
    }
    snapshot.with_context(|| format!("{repo_id}: nothing to resolve"))
}

/// Fetches missing files of a repo into the cache (the `download` feature: hf-hub's
/// downloader, which brings an HTTP client and progress bars).
#[cfg(feature = "download")]
struct Downloader<'a> {
    cache: &'a hf_hub::Cache,
    repo_id: &'a str,
    api: Option<hf_hub::api::sync::Api>,
}

#[cfg(feature = "download")]
impl<'a> Downloader<'a> {
    fn new(cache: &'a hf_hub::Cache, repo_id: &'a str) -> Self {
        Self { cache, repo_id, api: None }
    }

    /// The first of `alternatives` the repo provides, downloaded into the cache.
    fn get_any<'f>(&mut self, alternatives: &[&'f str]) -> Result<(&'f str, PathBuf)> {
        if self.api.is_none() {
            let api = hf_hub::api::sync::ApiBuilder::from_cache(self.cache.clone())
                .build()
                .context("cannot start the Hugging Face downloader")?;
            self.api = Some(api);
        }
        let repo = self.api.as_ref().expect("set above").model(self.repo_id.to_string());
        let mut last_error = None;
        for file in alternatives {
            tracing::info!(repo_id = self.repo_id, file, "downloading");
            match repo.get(file) {
                Ok(path) => return Ok((file, path)),
                Err(e) => last_error = Some(e),
            }
        }
        match last_error {
            Some(e) => bail!("downloading failed: {e}"),
            None => bail!("downloading failed: no file to fetch"),
        }
    }
}

/// Without the `download` feature only the cache is read.
#[cfg(not(feature = "download"))]
struct Downloader;

#[cfg(not(feature = "download"))]
impl Downloader {
    fn new(_cache: &hf_hub::Cache, _repo_id: &str) -> Self {
        Self
    }

    fn get_any<'f>(&mut self, _alternatives: &[&'f str]) -> Result<(&'f str, PathBuf)> {
        bail!("this build cannot download (built without the engine's `download` feature)")
    }
}
