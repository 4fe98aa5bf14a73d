//! Single-file checkpoints in the original (latent-diffusion / ControlNet) layout: their tensor
//! names mapped to the diffusers names the engine's models load, and the models' configs built
//! from the tensors' shapes.
//!
//! Layouts read (the names diffusers' `from_single_file` reads for the same models):
//! - a Stable Diffusion 1.x checkpoint: the UNet under `model.diffusion_model.`, the VAE under
//!   `first_stage_model.`, the CLIP text encoder under `cond_stage_model.transformer.`
//!   (transformers' own names below it, with or without `text_model.`);
//! - a ControlNet: `control_model.` (or the same names without the prefix): the UNet's encoder
//!   half plus `input_hint_block.*` (the control image's embedding), `zero_convs.*` and
//!   `middle_block_out.*`; or diffusers' own names (`controlnet_cond_embedding.*`);
//! - a VAE: `encoder.*` / `decoder.*` / `quant_conv` / `post_quant_conv` in the original layout
//!   (optionally under `first_stage_model.` or `vae.`, so a whole checkpoint works too), or in
//!   diffusers' layout (`encoder.down_blocks.*`).
//!
//! The name mapping (original -> diffusers):
//! - UNet / ControlNet: `time_embed.{0,2}` -> `time_embedding.linear_{1,2}`; `input_blocks.0.0`
//!   -> `conv_in`; `input_blocks.i` (i >= 1) -> down block `(i-1) / (L+1)`, position
//!   `(i-1) % (L+1)` with L resnets per block: `.0` its resnet (or, at position L, `.0.op` the
//!   downsampler's conv), `.1` its attention; `middle_block.k` -> `mid_block` resnets and
//!   attention in order; `output_blocks.i` -> up block `i / (L+1)`, position `i % (L+1)`
//!   (`.0` resnet, `.1` attention, `.1.conv` / `.2.conv` the upsampler); `out.{0,2}` ->
//!   `conv_norm_out` / `conv_out`. Inside a resnet `in_layers.{0,2}` -> `norm1`/`conv1`,
//!   `emb_layers.1` -> `time_emb_proj`, `out_layers.{0,3}` -> `norm2`/`conv2`,
//!   `skip_connection` -> `conv_shortcut`; attention blocks keep their names. ControlNet:
//!   `zero_convs.i.0` -> `controlnet_down_blocks.i`, `middle_block_out.0` ->
//!   `controlnet_mid_block`, `input_hint_block` convs in order -> `controlnet_cond_embedding`'s
//!   `conv_in`, `blocks.*`, `conv_out`.
//! - VAE: `{encoder,decoder}.norm_out` -> `conv_norm_out`; `encoder.down.i.block.j` ->
//!   `encoder.down_blocks.i.resnets.j`, `.downsample.conv` -> `.downsamplers.0.conv`;
//!   `decoder.up.i` -> `decoder.up_blocks.(n-1-i)` (reversed), `.upsample.conv` ->
//!   `.upsamplers.0.conv`; `mid.block_{1,2}` -> `mid_block.resnets.{0,1}`; `mid.attn_1`'s
//!   `norm`/`q`/`k`/`v`/`proj_out` -> `group_norm`/`to_q`/`to_k`/`to_v`/`to_out.0`, their 1x1
//!   convolution weights read as linear weights; `nin_shortcut` -> `conv_shortcut`.
//! - Text encoder: the prefix removed; the `position_ids` buffer ignored.
//!
//! Tensors outside these prefixes are ignored: the EMA copies some checkpoints carry
//! (`model_ema.*`; the `model.diffusion_model.*` weights are used, as diffusers does by
//! default), the training buffers (`alphas_cumprod`, ...), a VAE file's `loss.*`.
//!
//! Configs: block widths, layers per block, block kinds, channels, cross-attention width,
//! transformer depth, projection kind (conv or linear), the VAE's widths and latent channels,
//! the text encoder's width, depth, MLP width, vocabulary and positions all come from the
//! shapes. What the weights cannot show is SD1.x's: 8 attention heads in every UNet/ControlNet
//! block (`attention_head_dim: 8`, SD1.5's v1-inference.yaml `num_heads: 8`), GroupNorm with 32
//! groups, text-encoder heads of width 64 (CLIP ViT-L/14's 12 for 768), quick_gelu, the VAE's
//! scaling factor 0.18215. A file whose model departs from these can say so in its safetensors
//! metadata: `sdcrossframe.unet_config`, `sdcrossframe.controlnet_config`,
//! `sdcrossframe.vae_config`, `sdcrossframe.text_encoder_config`, each a JSON object of
//! diffusers / transformers config keys that replace the built values (the tiny test models use
//! it; released SD1.x files need none).
//!
//! Other families are refused with what they are: SDXL (`conditioner.embedders.*`), SD2.x
//! (an OpenCLIP text encoder `cond_stage_model.model.*`, or 1024-wide text / cross-attention),
//! inpainting and other UNets without 4 input channels, UNets with class embeddings.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::models::clip::ClipTextConfig;
use crate::models::controlnet::ControlNetConfig;
use crate::models::unet::UNet2DConditionConfig;
use crate::models::vae::AutoencoderKLConfig;
use crate::weights::{self, TensorSource};

/// The UNet of an original-layout checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// The VAE of an original-layout checkpoint (`vae.` in some re-packaged files).
pub const VAE_PREFIXES: &[&str] = &["first_stage_model.", "vae."];
/// The CLIP text encoder of an SD1.x checkpoint.
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// The ControlNet of a ControlNet checkpoint.
pub const CONTROLNET_PREFIX: &str = "control_model.";
/// SD2.x's OpenCLIP text encoder.
const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's text encoders.
const SDXL_PREFIX: &str = "conditioner.embedders.";

/// Extensions of PyTorch pickle files, refused with a conversion hint.
pub const PICKLE_EXTENSIONS: &[&str] = &["ckpt", "pt", "pth", "bin"];

/// Whether `path` names a PyTorch pickle file (by its extension).
pub fn is_pickle(path: &Path) -> bool {
    path.extension().is_some_and(|ext| PICKLE_EXTENSIONS.iter().any(|p| ext.eq_ignore_ascii_case(p)))
}

/// The error for a pickle file given as `what` (model, controlnet, vae): names the file and
/// says how to convert it.
pub fn pickle_error(path: &Path, what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{} (the {what} setting) is a PyTorch pickle file; sdcrossframe reads only safetensors (pickles can run code when \
         loaded). Convert it once, e.g. `python -c \"import torch, safetensors.torch as st; \
         sd = torch.load('{0}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); \
         st.save_file({{k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, '{1}')\"`, \
         and pass the .safetensors file",
        path.display(),
        path.with_extension("safetensors").display()
    )
}

/// A `model` / `controlnet` / `vae` setting that names a single file (an existing file, or a
/// path ending in `.safetensors` or a pickle extension) rather than a directory or repo id.
pub fn names_a_file(spec: &str) -> bool {
    let path = Path::new(spec);
    path.is_file()
        || (!path.is_dir()
            && (is_pickle(path) || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))))
}

/// Checks a single-file setting before it is read: it exists, and is no pickle.
fn check_file(path: &Path, what: &str) -> Result<()> {
    if is_pickle(path) {
        return Err(pickle_error(path, what));
    }
    if !path.is_file() {
        bail!(
            "{what} file {} does not exist (single-file checkpoints are read from local files; a Hugging Face repo \
             is named by its id, owner/name)",
            path.display()
        );
    }
    Ok(())
}

/// An opened safetensors file: its tensors' names and shapes, its metadata, its memory map.
struct File {
    path: PathBuf,
    /// None for a file known only by its shapes (the unit tests' SD1.5 layouts).
    tensors: Option<MmapedSafetensors>,
    shapes: BTreeMap<String, Vec<usize>>,
    metadata: HashMap<String, String>,
}

impl File {
    fn open(path: &Path) -> Result<Arc<Self>> {
        weights::validate_safetensors(path)?;
        // SAFETY: a read-only map of a file nobody modifies while the model loads (as in
        // `weights::var_builder`).
        let tensors = unsafe { MmapedSafetensors::new(path) }
            .with_context(|| format!("cannot read safetensors file {}", path.display()))?;
        let shapes = tensors.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect();
        let metadata = weights::safetensors_metadata(path)?;
        Ok(Arc::new(Self { path: path.to_path_buf(), tensors: Some(tensors), shapes, metadata }))
    }

    /// A file of these tensor shapes and no data.
    #[cfg(test)]
    fn from_shapes(path: &str, shapes: BTreeMap<String, Vec<usize>>) -> Arc<Self> {
        Arc::new(Self { path: path.into(), tensors: None, shapes, metadata: HashMap::new() })
    }

    fn has_prefix(&self, prefix: &str) -> bool {
        self.shapes.range(prefix.to_string()..).next().is_some_and(|(k, _)| k.starts_with(prefix))
    }

    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(name).map(Vec::as_slice)
    }

    /// A few of the file's tensor names, for errors.
    fn sample_names(&self) -> String {
        let mut groups: Vec<String> = Vec::new();
        for name in self.shapes.keys() {
            let parts: Vec<&str> = name.split('.').collect();
            let group = if parts.len() > 2 { format!("{}.{}.*", parts[0], parts[1]) } else { name.clone() };
            if !groups.contains(&group) {
                groups.push(group);
            }
        }
        let shown: Vec<&str> = groups.iter().take(8).map(String::as_str).collect();
        let more = if groups.len() > 8 { format!(" and {} more groups", groups.len() - 8) } else { String::new() };
        let count = match self.shapes.len() {
            1 => "1 tensor".to_string(),
            n => format!("{n} tensors"),
        };
        format!("{count}, named {}{more}", shown.join(", "))
    }

    /// The JSON object of `sdcrossframe.<key>` in the metadata, if any.
    fn config_hint(&self, key: &str) -> Result<Map<String, Value>> {
        let name = format!("sdcrossframe.{key}");
        let Some(text) = self.metadata.get(&name) else { return Ok(Map::new()) };
        match serde_json::from_str(text) {
            Ok(Value::Object(map)) => Ok(map),
            _ => bail!("{}: metadata {name} is not a JSON object of config keys: {text}", self.path.display()),
        }
    }
}

/// How a tensor is read from the file.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Transform {
    Same,
    /// A 1x1 convolution weight `[out, in, 1, 1]` (or `[out, in, 1]`) read as `[out, in]`.
    ConvToLinear,
}

#[derive(Debug, Clone)]
struct Source {
    name: String,
    transform: Transform,
    /// The shape the model sees.
    shape: Vec<usize>,
}

/// One model's tensors in a single file, under their diffusers names.
#[derive(Clone)]
pub struct TensorView {
    file: Arc<File>,
    /// "UNet", "VAE", ...
    what: &'static str,
    map: BTreeMap<String, Source>,
}

impl TensorView {
    fn new(file: &Arc<File>, what: &'static str) -> Self {
        Self { file: file.clone(), what, map: BTreeMap::new() }
    }

    fn insert(&mut self, diffusers: String, original: &str, transform: Transform) -> Result<()> {
        let stored = self.file.shape(original).expect("mapped names come from the file").to_vec();
        let shape = match transform {
            Transform::Same => stored,
            Transform::ConvToLinear => match stored.as_slice() {
                [o, i] | [o, i, 1] | [o, i, 1, 1] => vec![*o, *i],
                other => bail!(
                    "{}: tensor {original} has shape {other:?}, not a 1x1 convolution or linear weight",
                    self.file.path.display()
                ),
            },
        };
        if let Some(previous) = self.map.get(&diffusers) {
            bail!(
                "{}: tensors {} and {original} both map to the {}'s {diffusers}",
                self.file.path.display(),
                previous.name,
                self.what
            );
        }
        self.map.insert(diffusers, Source { name: original.to_string(), transform, shape });
        Ok(())
    }

    /// Which model it is ("UNet", "VAE", "text encoder", "ControlNet").
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// The file it reads.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// The diffusers names it provides.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// The original name a diffusers name is read from.
    pub fn original_name(&self, diffusers: &str) -> Option<&str> {
        self.map.get(diffusers).map(|s| s.name.as_str())
    }

    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.map.get(name).map(|s| s.shape.as_slice())
    }

    /// The distinct numbers `n` of names `prefix` + `n` + `.`.
    fn indices(&self, prefix: &str) -> BTreeSet<usize> {
        self.map
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter_map(|(k, _)| k[prefix.len()..].split('.').next()?.parse().ok())
            .collect()
    }

    fn has_prefix(&self, prefix: &str) -> bool {
        self.map.range(prefix.to_string()..).next().is_some_and(|(k, _)| k.starts_with(prefix))
    }

    /// The shape of `name`, or an error naming the file and the tensor.
    fn need(&self, name: &str) -> Result<&[usize]> {
        self.shape(name).with_context(|| {
            format!("{}: the {} has no tensor for {name} (a diffusers name)", self.file.path.display(), self.what)
        })
    }

    /// Dimension `dim` of `name`'s shape.
    fn dim(&self, name: &str, dim: usize) -> Result<usize> {
        let shape = self.need(name)?;
        shape.get(dim).copied().with_context(|| {
            format!(
                "{}: tensor {} (the {}'s {name}) has shape {shape:?}, expected at least {} dimensions",
                self.file.path.display(),
                self.original_name(name).unwrap_or(name),
                self.what,
                dim + 1
            )
        })
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let Some(source) = self.map.get(name) else {
            return Err(candle_core::Error::Msg(format!(
                "{}: the {} needs {name}, which no tensor of the file maps to",
                self.file.path.display(),
                self.what
            )));
        };
        let Some(tensors) = &self.file.tensors else {
            return Err(candle_core::Error::Msg(format!("{}: no tensor data", self.file.path.display())));
        };
        let tensor = tensors.load(&source.name, device)?;
        match source.transform {
            Transform::Same => Ok(tensor),
            Transform::ConvToLinear => tensor.reshape(source.shape.as_slice()),
        }
    }

    /// A VarBuilder reading these tensors as `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let origin = crate::weights::TensorSource::describe(&self);
        crate::weights::FiniteWeights::var_builder(self, origin, dtype, device)
    }
}

impl TensorSource for TensorView {
    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.map.iter().map(|(k, s)| (k.clone(), s.shape.clone())).collect()
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        TensorView::load(self, name, device)
    }

    fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn describe(&self) -> String {
        format!("the {} of {}", self.what, self.file.path.display())
    }
}

impl SimpleBackend for TensorView {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor {} (the {}'s {name}) has shape {:?}, the model expects {:?}",
                self.file.path.display(),
                self.original_name(name).unwrap_or(name),
                self.what,
                tensor.dims(),
                s.dims()
            )));
        }
        tensor.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

/// A model read from a single file: its config and its tensors under diffusers names.
pub struct Part<C> {
    pub config: C,
    pub tensors: TensorView,
}

impl<C> Part<C> {
    pub fn map_config<D>(self, f: impl FnOnce(C) -> D) -> Part<D> {
        Part { config: f(self.config), tensors: self.tensors }
    }
}

/// The models of an SD1.x checkpoint.
pub struct Checkpoint {
    pub unet: Part<UNet2DConditionConfig>,
    pub text_encoder: Part<ClipTextConfig>,
    /// None when the checkpoint has no `first_stage_model.*` (a `vae` setting must give one)
    /// or it was not asked for.
    pub vae: Option<Part<AutoencoderKLConfig>>,
}

/// Reads an SD1.x checkpoint (the `model` setting naming a file); its VAE only with
/// `with_vae` (a `vae` setting replaces it otherwise, whatever it is).
pub fn read_checkpoint(path: &Path, with_vae: bool) -> Result<Checkpoint> {
    let _span = tracing::info_span!("single_file_checkpoint", path = %path.display()).entered();
    check_file(path, "model")?;
    checkpoint_of(&File::open(path)?, with_vae)
}

fn checkpoint_of(file: &Arc<File>, with_vae: bool) -> Result<Checkpoint> {
    let shown = file.path.display();
    let not_sd1 = |what: &str| -> Result<Checkpoint> {
        bail!("{shown} is {what}; sdcrossframe runs Stable Diffusion 1.x checkpoints (768-wide CLIP text encoder)")
    };
    if file.has_prefix(SDXL_PREFIX) {
        return not_sd1("an SDXL checkpoint (its text encoders are under conditioner.embedders.*, SDXL has two)");
    }
    if file.has_prefix(OPEN_CLIP_PREFIX) {
        return not_sd1(
            "a Stable Diffusion 2.x checkpoint (its text encoder is OpenCLIP, under cond_stage_model.model.*)",
        );
    }
    if !file.has_prefix(UNET_PREFIX) {
        return Err(not_a_checkpoint(file));
    }
    let in_channels = file.shape(&format!("{UNET_PREFIX}input_blocks.0.0.weight")).and_then(|s| s.get(1).copied());
    match in_channels {
        Some(9) => {
            return not_sd1(
                "an inpainting checkpoint (its UNet takes 9 input channels: latents, mask and masked image; \
                 model.diffusion_model.input_blocks.0.0.weight)",
            );
        }
        Some(4) => {}
        Some(n) => {
            return not_sd1(&format!(
                "not a text-to-image checkpoint (its UNet takes {n} input channels, SD1.x's takes 4; \
                 model.diffusion_model.input_blocks.0.0.weight)"
            ));
        }
        None => bail!("{shown}: model.diffusion_model.input_blocks.0.0.weight (the UNet's conv_in) is missing"),
    }
    if file.has_prefix(&format!("{UNET_PREFIX}label_emb.")) {
        return not_sd1(
            "a checkpoint whose UNet has class / label embeddings (model.diffusion_model.label_emb.*: an upscaler or \
             an SDXL-type UNet)",
        );
    }
    let cross_dim = file
        .shapes
        .iter()
        .find(|(k, _)| k.starts_with(UNET_PREFIX) && k.ends_with(".attn2.to_k.weight"))
        .and_then(|(_, s)| s.last().copied());
    if cross_dim == Some(1024) {
        return not_sd1(
            "a Stable Diffusion 2.x checkpoint (its UNet's cross-attention reads 1024-wide text: attn2.to_k.weight)",
        );
    }
    if !file.has_prefix(CLIP_PREFIX) {
        bail!(
            "{shown} has a UNet (model.diffusion_model.*) but no CLIP text encoder (cond_stage_model.transformer.*): \
             not a complete Stable Diffusion 1.x checkpoint"
        );
    }
    let text_encoder = text_encoder_part(file)?;
    if text_encoder.config.hidden_size == 1024 {
        return not_sd1("a Stable Diffusion 2.x checkpoint (its text encoder is 1024 wide)");
    }
    let unet = unet_part(file)?;
    let vae = match VAE_PREFIXES.iter().find(|p| file.has_prefix(p)) {
        Some(prefix) if with_vae => Some(vae_part(file, prefix)?),
        _ => None,
    };
    let text_width = text_encoder.config.hidden_size;
    if let Some(cross) = cross_dim
        && cross != text_width
    {
        bail!("{shown}: the UNet's cross-attention reads {cross}-wide text, but the text encoder is {text_width} wide");
    }
    Ok(Checkpoint { unet, text_encoder, vae })
}

/// The error for a file with no UNet under `model.diffusion_model.`.
fn not_a_checkpoint(file: &File) -> anyhow::Error {
    let shown = file.path.display();
    if file.has_prefix(CONTROLNET_PREFIX) || file.shapes.contains_key("input_hint_block.0.weight") {
        return anyhow::anyhow!(
            "{shown} is a ControlNet (control_model.* / input_hint_block.*), not a Stable Diffusion checkpoint: \
             pass it as the controlnet setting (--controlnet, property controlnet)"
        );
    }
    if vae_layout(file).is_some() {
        return anyhow::anyhow!(
            "{shown} is a VAE (encoder.* / decoder.*), not a Stable Diffusion checkpoint: pass it as the vae setting \
             (--vae, property vae) and a checkpoint or pipeline as the model"
        );
    }
    if file.shapes.contains_key("conv_in.weight") || file.has_prefix("down_blocks.") {
        return anyhow::anyhow!(
            "{shown} holds one model in diffusers' names (conv_in, down_blocks.*: a file of a diffusers directory): \
             pass the whole diffusers pipeline directory as the model, not one of its files"
        );
    }
    anyhow::anyhow!(
        "{shown} is not a Stable Diffusion 1.x checkpoint: looked for the UNet under {UNET_PREFIX}*, the VAE under \
         first_stage_model.*, the CLIP text encoder under {CLIP_PREFIX}* (and SDXL's conditioner.embedders.*, SD2's \
         cond_stage_model.model.*, a ControlNet's control_model.*) and found none; it has {}",
        file.sample_names()
    )
}

/// Reads a ControlNet file (the `controlnet` setting naming a file).
pub fn read_controlnet(path: &Path) -> Result<Part<ControlNetConfig>> {
    let _span = tracing::info_span!("single_file_controlnet", path = %path.display()).entered();
    check_file(path, "controlnet")?;
    controlnet_of(&File::open(path)?)
}

fn controlnet_of(file: &Arc<File>) -> Result<Part<ControlNetConfig>> {
    let shown = file.path.display();
    let mut view = TensorView::new(file, "ControlNet");
    if file.has_prefix(CONTROLNET_PREFIX) {
        map_unet_layout(&mut view, CONTROLNET_PREFIX, true)?;
    } else if file.shapes.contains_key("time_embed.0.weight") && file.shapes.contains_key("input_hint_block.0.weight") {
        map_unet_layout(&mut view, "", true)?;
    } else if file.shapes.contains_key("controlnet_cond_embedding.conv_in.weight") {
        if file.has_prefix("add_embedding.") {
            bail!("{shown} is an SDXL ControlNet (add_embedding.*); sdcrossframe runs SD1.x ControlNets");
        }
        for name in file.shapes.keys() {
            view.insert(name.clone(), name, Transform::Same)?;
        }
    } else if file.has_prefix(UNET_PREFIX) {
        bail!(
            "{shown} is a Stable Diffusion checkpoint (model.diffusion_model.*), not a ControlNet: pass it as the \
             model setting"
        );
    } else {
        bail!(
            "{shown} is not a ControlNet: looked for {CONTROLNET_PREFIX}* (the original layout, e.g. \
             control_v11p_sd15_canny.safetensors), time_embed.* with input_hint_block.* (the same without the \
             prefix) and diffusers' controlnet_cond_embedding.*; it has {}",
            file.sample_names()
        );
    }
    let mut config = encoder_config(&view)?;
    if let Some(&cross) = config.get("cross_attention_dim").and_then(Value::as_u64).as_ref()
        && cross == 1024
    {
        bail!("{shown} is a ControlNet for Stable Diffusion 2.x (its cross-attention reads 1024-wide text)");
    }
    let conv_in = "controlnet_cond_embedding.conv_in.weight";
    let mut embedding = vec![view.dim(conv_in, 0)?];
    let blocks = view.indices("controlnet_cond_embedding.blocks.");
    if !blocks.len().is_multiple_of(2) || blocks.iter().enumerate().any(|(i, b)| i != *b) {
        bail!(
            "{shown}: the control image embedding has {} convolutions between its first and last; expected pairs \
             (one per width step)",
            blocks.len()
        );
    }
    for pair in 0..blocks.len() / 2 {
        embedding.push(view.dim(&format!("controlnet_cond_embedding.blocks.{}.weight", 2 * pair + 1), 0)?);
    }
    config.insert("_class_name".into(), json!("ControlNetModel"));
    config.insert("conditioning_channels".into(), json!(view.dim(conv_in, 1)?));
    config.insert("conditioning_embedding_out_channels".into(), json!(embedding));
    let config = finish_config(config, file.config_hint("controlnet_config")?, file, "ControlNet")?;
    Ok(Part { config, tensors: view })
}

/// Reads a VAE file (the `vae` setting naming a file).
pub fn read_vae(path: &Path) -> Result<Part<AutoencoderKLConfig>> {
    let _span = tracing::info_span!("single_file_vae", path = %path.display()).entered();
    check_file(path, "vae")?;
    vae_of(&File::open(path)?)
}

fn vae_of(file: &Arc<File>) -> Result<Part<AutoencoderKLConfig>> {
    match vae_layout(file) {
        Some(VaeLayout::Original(prefix)) => vae_part(file, prefix),
        Some(VaeLayout::Diffusers) => {
            let mut view = TensorView::new(file, "VAE");
            for name in file.shapes.keys() {
                if ["encoder.", "decoder.", "quant_conv.", "post_quant_conv."].iter().any(|p| name.starts_with(p)) {
                    view.insert(name.clone(), name, Transform::Same)?;
                }
            }
            let config = vae_config(&view)?;
            let config = finish_config(config, file.config_hint("vae_config")?, file, "VAE")?;
            Ok(Part { config, tensors: view })
        }
        None => bail!(
            "{} is not a VAE: looked for encoder.* / decoder.* in the original layout (encoder.down.0.block.0.*, \
             also under first_stage_model. or vae.) and in diffusers' (encoder.down_blocks.0.resnets.0.*); it has {}",
            file.path.display(),
            file.sample_names()
        ),
    }
}

enum VaeLayout {
    /// The original layout under this prefix ("" for a VAE file).
    Original(&'static str),
    Diffusers,
}

fn vae_layout(file: &File) -> Option<VaeLayout> {
    for prefix in ["", VAE_PREFIXES[0], VAE_PREFIXES[1]] {
        if file.shapes.contains_key(&format!("{prefix}encoder.down.0.block.0.conv1.weight")) {
            return Some(VaeLayout::Original(prefix));
        }
    }
    file.shapes.contains_key("encoder.down_blocks.0.resnets.0.conv1.weight").then_some(VaeLayout::Diffusers)
}

/// Block and layer numbers above this are no model's (and would overflow the arithmetic).
const MAX_INDEX: usize = 10_000;

/// Parses `prefix` + `n` + `.` at the start of `name`: `(n, rest)`.
fn numbered<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (number, rest) = rest.split_once('.')?;
    let n: usize = number.parse().ok()?;
    (n <= MAX_INDEX).then_some((n, rest))
}

/// A resnet's parameter name, original -> diffusers.
fn resnet_name(rest: &str) -> Option<String> {
    const PARTS: &[(&str, &str)] = &[
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    PARTS.iter().find_map(|(from, to)| rest.strip_prefix(from).map(|p| format!("{to}{p}")))
}

fn is_resnet_part(rest: &str) -> bool {
    resnet_name(rest).is_some()
}

/// Maps the UNet (or ControlNet) tensors under `prefix` into `view`.
fn map_unet_layout(view: &mut TensorView, prefix: &str, controlnet: bool) -> Result<()> {
    let file = view.file.clone();
    let shown = file.path.display();
    let names: Vec<&String> = file.shapes.keys().filter(|k| k.starts_with(prefix)).collect();
    let rest = |name: &str| name[prefix.len()..].to_string();
    // Input blocks: 0 is conv_in; then per level L resnets (with attentions) and a downsampler.
    let inputs: BTreeSet<usize> =
        names.iter().filter_map(|n| numbered(&n[prefix.len()..], "input_blocks.")).map(|(i, _)| i).collect();
    let downsamplers: BTreeSet<usize> = inputs
        .iter()
        .copied()
        .filter(|i| file.shapes.contains_key(&format!("{prefix}input_blocks.{i}.0.op.weight")))
        .collect();
    let last_input = inputs.last().copied().unwrap_or(0);
    let layers = match downsamplers.first() {
        Some(first) => first.saturating_sub(1),
        None => last_input,
    };
    let levels = downsamplers.len() + 1;
    if layers == 0 || last_input != levels * (layers + 1) - 1 || inputs.len() != last_input + 1 {
        bail!(
            "{shown}: the input blocks ({prefix}input_blocks.*: {} of them, downsamplers at {downsamplers:?}) do not \
             form levels of equally many resnets",
            inputs.len()
        );
    }
    let outputs: BTreeSet<usize> =
        names.iter().filter_map(|n| numbered(&n[prefix.len()..], "output_blocks.")).map(|(i, _)| i).collect();
    let middle: Vec<usize> = names
        .iter()
        .filter_map(|n| numbered(&n[prefix.len()..], "middle_block."))
        .map(|(i, _)| i)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let middle_is_resnet = |k: usize| {
        names
            .iter()
            .any(|n| numbered(&n[prefix.len()..], "middle_block.").is_some_and(|(i, r)| i == k && is_resnet_part(r)))
    };
    let hint: Vec<usize> = names
        .iter()
        .filter_map(|n| numbered(&n[prefix.len()..], "input_hint_block."))
        .map(|(i, _)| i)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for name in &names {
        let r = rest(name);
        let mapped: Option<(String, Transform)> = (|| {
            let same = |s: String| Some((s, Transform::Same));
            if let Some(p) = r.strip_prefix("time_embed.0.") {
                return same(format!("time_embedding.linear_1.{p}"));
            }
            if let Some(p) = r.strip_prefix("time_embed.2.") {
                return same(format!("time_embedding.linear_2.{p}"));
            }
            if let Some(p) = r.strip_prefix("input_blocks.0.0.") {
                return same(format!("conv_in.{p}"));
            }
            if let Some((i, sub)) = numbered(&r, "input_blocks.").filter(|(i, _)| *i > 0) {
                let (block, layer) = ((i - 1) / (layers + 1), (i - 1) % (layers + 1));
                if let Some(p) = sub.strip_prefix("0.op.") {
                    return same(format!("down_blocks.{block}.downsamplers.0.conv.{p}"));
                }
                if let Some(p) = sub.strip_prefix("0.") {
                    return same(format!("down_blocks.{block}.resnets.{layer}.{}", resnet_name(p)?));
                }
                if let Some(p) = sub.strip_prefix("1.") {
                    return same(format!("down_blocks.{block}.attentions.{layer}.{p}"));
                }
                return None;
            }
            if let Some((k, sub)) = numbered(&r, "middle_block.") {
                // Each part of the middle block is a resnet or an attention, never a mix.
                let is_resnet = middle_is_resnet(k);
                let ordinal = middle.iter().filter(|&&m| m < k && middle_is_resnet(m) == is_resnet).count();
                return match (resnet_name(sub), is_resnet) {
                    (Some(p), true) => same(format!("mid_block.resnets.{ordinal}.{p}")),
                    (None, false) => same(format!("mid_block.attentions.{ordinal}.{sub}")),
                    _ => None,
                };
            }
            if controlnet {
                if let Some((i, sub)) = numbered(&r, "zero_convs.") {
                    return same(format!("controlnet_down_blocks.{i}.{}", sub.strip_prefix("0.")?));
                }
                if let Some(p) = r.strip_prefix("middle_block_out.0.") {
                    return same(format!("controlnet_mid_block.{p}"));
                }
                if let Some((k, p)) = numbered(&r, "input_hint_block.") {
                    let position = hint.iter().position(|&h| h == k)?;
                    return if position == 0 {
                        same(format!("controlnet_cond_embedding.conv_in.{p}"))
                    } else if position + 1 == hint.len() {
                        same(format!("controlnet_cond_embedding.conv_out.{p}"))
                    } else {
                        same(format!("controlnet_cond_embedding.blocks.{}.{p}", position - 1))
                    };
                }
                return None;
            }
            if let Some((i, sub)) = numbered(&r, "output_blocks.") {
                let (block, layer) = (i / (layers + 1), i % (layers + 1));
                if let Some(p) = sub.strip_prefix("0.") {
                    return same(format!("up_blocks.{block}.resnets.{layer}.{}", resnet_name(p)?));
                }
                if let Some(p) = sub.strip_prefix("1.conv.").or_else(|| sub.strip_prefix("2.conv.")) {
                    return same(format!("up_blocks.{block}.upsamplers.0.conv.{p}"));
                }
                if let Some(p) = sub.strip_prefix("1.") {
                    return same(format!("up_blocks.{block}.attentions.{layer}.{p}"));
                }
                return None;
            }
            if let Some(p) = r.strip_prefix("out.0.") {
                return same(format!("conv_norm_out.{p}"));
            }
            if let Some(p) = r.strip_prefix("out.2.") {
                return same(format!("conv_out.{p}"));
            }
            None
        })();
        match mapped {
            Some((diffusers, transform)) => view.insert(diffusers, name, transform)?,
            None => bail!(
                "{shown}: tensor {name} is not part of a Stable Diffusion 1.x {} (no diffusers name for it)",
                view.what
            ),
        }
    }
    if !controlnet && outputs.len() != levels * (layers + 1) {
        bail!(
            "{shown}: the UNet has {} output blocks; {levels} levels of {layers} resnets need {}",
            outputs.len(),
            levels * (layers + 1)
        );
    }
    Ok(())
}

/// The config keys the UNet and the ControlNet share, from the shapes of their encoder half.
fn encoder_config(view: &TensorView) -> Result<Map<String, Value>> {
    let shown = view.path().display();
    let levels = view.indices("down_blocks.");
    if levels.is_empty() || levels.iter().enumerate().any(|(i, l)| i != *l) {
        bail!("{shown}: the {} has no down blocks numbered from 0 ({levels:?})", view.what);
    }
    let mut widths = Vec::new();
    let mut kinds = Vec::new();
    let mut depths = Vec::new();
    let layers = view.indices("down_blocks.0.resnets.").len();
    for level in &levels {
        let block = format!("down_blocks.{level}.");
        widths.push(view.dim(&format!("{block}resnets.0.conv1.weight"), 0)?);
        let n = view.indices(&format!("{block}resnets.")).len();
        if n != layers {
            bail!("{shown}: down block {level} has {n} resnets, down block 0 has {layers}");
        }
        if view.has_prefix(&format!("{block}attentions.")) {
            kinds.push("CrossAttnDownBlock2D");
            depths.push(view.indices(&format!("{block}attentions.0.transformer_blocks.")).len());
        } else {
            kinds.push("DownBlock2D");
            depths.push(1);
        }
    }
    let attn = view.map.iter().find(|(k, _)| k.ends_with(".attn2.to_k.weight"));
    let mut config = Map::new();
    if let Some((_, source)) = attn {
        config.insert("cross_attention_dim".into(), json!(source.shape.get(1).copied().unwrap_or(0)));
    }
    let linear = view.map.iter().find(|(k, _)| k.ends_with(".proj_in.weight")).is_some_and(|(_, s)| s.shape.len() == 2);
    let mid = if view.has_prefix("mid_block.attentions.") {
        Value::from("UNetMidBlock2DCrossAttn")
    } else if view.has_prefix("mid_block.resnets.") {
        Value::from("UNetMidBlock2D")
    } else {
        Value::Null
    };
    let depth = if depths.iter().all(|d| *d == depths[0]) { json!(depths[0]) } else { json!(depths) };
    for (key, value) in [
        ("in_channels", json!(view.dim("conv_in.weight", 1)?)),
        ("block_out_channels", json!(widths)),
        ("down_block_types", json!(kinds)),
        ("layers_per_block", json!(layers)),
        ("mid_block_type", mid),
        ("use_linear_projection", json!(linear)),
        ("transformer_layers_per_block", depth),
        // What the weights cannot show: SD1.x's (see the module docs).
        ("attention_head_dim", json!(8)),
        ("norm_num_groups", json!(32)),
        ("norm_eps", json!(1e-5)),
        ("flip_sin_to_cos", json!(true)),
        ("freq_shift", json!(0)),
    ] {
        config.insert(key.into(), value);
    }
    Ok(config)
}

fn unet_part(file: &Arc<File>) -> Result<Part<UNet2DConditionConfig>> {
    let mut view = TensorView::new(file, "UNet");
    map_unet_layout(&mut view, UNET_PREFIX, false)?;
    let mut config = encoder_config(&view)?;
    let ups = view.indices("up_blocks.");
    let kinds: Vec<&str> = ups
        .iter()
        .map(
            |b| if view.has_prefix(&format!("up_blocks.{b}.attentions.")) { "CrossAttnUpBlock2D" } else { "UpBlock2D" },
        )
        .collect();
    config.insert("_class_name".into(), json!("UNet2DConditionModel"));
    config.insert("up_block_types".into(), json!(kinds));
    config.insert("out_channels".into(), json!(view.dim("conv_out.weight", 0)?));
    let config = finish_config(config, file.config_hint("unet_config")?, file, "UNet")?;
    Ok(Part { config, tensors: view })
}

fn text_encoder_part(file: &Arc<File>) -> Result<Part<ClipTextConfig>> {
    let mut view = TensorView::new(file, "text encoder");
    for name in file.shapes.keys().filter(|k| k.starts_with(CLIP_PREFIX)) {
        let rest = &name[CLIP_PREFIX.len()..];
        if rest.ends_with("position_ids") {
            continue;
        }
        view.insert(rest.to_string(), name, Transform::Same)?;
    }
    let base = if view.map.contains_key("text_model.embeddings.token_embedding.weight") { "text_model." } else { "" };
    let token = format!("{base}embeddings.token_embedding.weight");
    let (vocab, width) = (view.dim(&token, 0)?, view.dim(&token, 1)?);
    let layers = view.indices(&format!("{base}encoder.layers.")).len();
    if layers == 0 {
        bail!("{}: the text encoder has no layers ({CLIP_PREFIX}{base}encoder.layers.*)", file.path.display());
    }
    let config = json!({
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": view.dim(&format!("{base}encoder.layers.0.mlp.fc1.weight"), 0)?,
        "num_hidden_layers": layers,
        // CLIP's heads are 64 wide (ViT-L/14: 12 heads of 768).
        "num_attention_heads": (width / 64).max(1),
        "max_position_embeddings": view.dim(&format!("{base}embeddings.position_embedding.weight"), 0)?,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    });
    let Value::Object(config) = config else { unreachable!("a JSON object literal") };
    let config: ClipTextConfig = finish_config(config, file.config_hint("text_encoder_config")?, file, "text encoder")?;
    if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
        bail!(
            "{}: the text encoder is {} wide, not a multiple of 64-wide heads; name its heads in the metadata \
             sdcrossframe.text_encoder_config ({{\"num_attention_heads\": N}})",
            file.path.display(),
            config.hidden_size
        );
    }
    Ok(Part { config, tensors: view })
}

/// VAE names, original -> diffusers (after the prefix); `levels` is the decoder's count.
fn vae_name(rest: &str, levels: usize) -> Option<(String, Transform)> {
    let same = |s: String| Some((s, Transform::Same));
    for top in ["quant_conv.", "post_quant_conv."] {
        if rest.starts_with(top) {
            return same(rest.to_string());
        }
    }
    let (side, rest) = rest.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let resnet = |p: &str| p.replacen("nin_shortcut.", "conv_shortcut.", 1);
    if let Some(p) = rest.strip_prefix("conv_in.").or_else(|| rest.strip_prefix("conv_out.")) {
        let head = &rest[..rest.len() - p.len()];
        return same(format!("{side}.{head}{p}"));
    }
    if let Some(p) = rest.strip_prefix("norm_out.") {
        return same(format!("{side}.conv_norm_out.{p}"));
    }
    if let Some(p) = rest.strip_prefix("mid.block_1.") {
        return same(format!("{side}.mid_block.resnets.0.{}", resnet(p)));
    }
    if let Some(p) = rest.strip_prefix("mid.block_2.") {
        return same(format!("{side}.mid_block.resnets.1.{}", resnet(p)));
    }
    if let Some(p) = rest.strip_prefix("mid.attn_1.") {
        let (part, param) = p.split_once('.')?;
        let to = match part {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        let transform = if part != "norm" && param == "weight" { Transform::ConvToLinear } else { Transform::Same };
        return Some((format!("{side}.mid_block.attentions.0.{to}.{param}"), transform));
    }
    let encoder = side == "encoder";
    let (i, sub) = numbered(rest, if encoder { "down." } else { "up." })?;
    // The decoder's `up.i` are diffusers' up blocks in reverse order.
    let level = if encoder { Some(i) } else { levels.checked_sub(i + 1) }?;
    let kind = if encoder { "down_blocks" } else { "up_blocks" };
    if let Some((j, p)) = numbered(sub, "block.") {
        return same(format!("{side}.{kind}.{level}.resnets.{j}.{}", resnet(p)));
    }
    let (sampler, diffusers_sampler) =
        if encoder { ("downsample.conv.", "downsamplers") } else { ("upsample.conv.", "upsamplers") };
    let p = sub.strip_prefix(sampler)?;
    same(format!("{side}.{kind}.{level}.{diffusers_sampler}.0.conv.{p}"))
}

fn vae_part(file: &Arc<File>, prefix: &str) -> Result<Part<AutoencoderKLConfig>> {
    let mut view = TensorView::new(file, "VAE");
    let levels =
        file.shapes.keys().filter_map(|k| numbered(k.strip_prefix(prefix)?, "decoder.up.")).map(|(i, _)| i).max();
    let levels = levels.map_or(0, |l| l + 1);
    for name in file.shapes.keys() {
        let Some(rest) = name.strip_prefix(prefix) else { continue };
        if !["encoder.", "decoder.", "quant_conv.", "post_quant_conv."].iter().any(|p| rest.starts_with(p)) {
            continue;
        }
        match vae_name(rest, levels) {
            Some((diffusers, transform)) => view.insert(diffusers, name, transform)?,
            None => bail!("{}: tensor {name} is not part of a VAE (no diffusers name for it)", file.path.display()),
        }
    }
    let config = vae_config(&view)?;
    let config = finish_config(config, file.config_hint("vae_config")?, file, "VAE")?;
    Ok(Part { config, tensors: view })
}

fn vae_config(view: &TensorView) -> Result<Map<String, Value>> {
    let shown = view.path().display();
    let levels = view.indices("encoder.down_blocks.");
    if levels.is_empty() || levels.iter().enumerate().any(|(i, l)| i != *l) {
        bail!("{shown}: the VAE's encoder has no down blocks numbered from 0 ({levels:?})");
    }
    let widths = levels
        .iter()
        .map(|l| view.dim(&format!("encoder.down_blocks.{l}.resnets.0.conv1.weight"), 0))
        .collect::<Result<Vec<_>>>()?;
    let ups = view.indices("decoder.up_blocks.").len();
    if ups != levels.len() {
        bail!("{shown}: the VAE's decoder has {ups} up blocks, its encoder {} down blocks", levels.len());
    }
    let config = json!({
        "_class_name": "AutoencoderKL",
        "in_channels": view.dim("encoder.conv_in.weight", 1)?,
        "out_channels": view.dim("decoder.conv_out.weight", 0)?,
        "block_out_channels": widths,
        "down_block_types": vec!["DownEncoderBlock2D"; levels.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; levels.len()],
        "layers_per_block": view.indices("encoder.down_blocks.0.resnets.").len(),
        "latent_channels": view.dim("decoder.conv_in.weight", 1)?,
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
        "use_quant_conv": view.has_prefix("quant_conv."),
        "use_post_quant_conv": view.has_prefix("post_quant_conv."),
        "mid_block_add_attention": view.has_prefix("encoder.mid_block.attentions."),
        "act_fn": "silu",
    });
    let Value::Object(config) = config else { unreachable!("a JSON object literal") };
    Ok(config)
}

/// Applies the file's config hint over the built config and parses it. GroupNorm's groups
/// must divide every block's width (the weights cannot show them; SD1.x has 32).
fn finish_config<C: DeserializeOwned>(
    mut config: Map<String, Value>,
    hint: Map<String, Value>,
    file: &File,
    what: &str,
) -> Result<C> {
    for (key, value) in hint {
        config.insert(key, value);
    }
    if let (Some(groups), Some(Value::Array(widths))) =
        (config.get("norm_num_groups").and_then(Value::as_u64), config.get("block_out_channels"))
        && let Some(width) = widths.iter().filter_map(Value::as_u64).find(|w| groups == 0 || w % groups != 0)
    {
        let key = match what {
            "UNet" => "unet_config",
            "ControlNet" => "controlnet_config",
            _ => "vae_config",
        };
        bail!(
            "{}: the {what}'s {width}-channel blocks do not split into {groups} GroupNorm groups (SD1.x's count, which \
             the weights cannot show); a model with other groups names them in the file's metadata \
             sdcrossframe.{key} ({{\"norm_num_groups\": N}})",
            file.path.display()
        );
    }
    let built = Value::Object(config.clone());
    tracing::debug!(file = %file.path.display(), what, config = %built, "config built from the shapes");
    serde_json::from_value(Value::Object(config.clone())).with_context(|| {
        format!(
            "{}: the {what} config built from its shapes does not parse: {}",
            file.path.display(),
            Value::Object(config)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::sd15;

    /// The names and shapes of real SD1.5 single files (tests/fixtures/single-file/
    /// sd15_shapes.json, checked with diffusers' converters by make_singlefile_fixtures.py).
    fn sd15_file(kind: &str, change: impl FnOnce(&mut BTreeMap<String, Vec<usize>>)) -> Arc<File> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/single-file/sd15_shapes.json");
        let all: BTreeMap<String, BTreeMap<String, Vec<usize>>> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut shapes = all[kind].clone();
        change(&mut shapes);
        File::from_shapes(&format!("{kind}.safetensors"), shapes)
    }

    fn debug(v: &dyn std::fmt::Debug) -> String {
        format!("{v:?}")
    }

    #[test]
    fn sd15_files_give_sd15_configs() {
        let checkpoint = checkpoint_of(&sd15_file("checkpoint", |_| {}), true).unwrap();
        assert_eq!(debug(&checkpoint.unet.config), debug(&sd15::unet_config().unwrap()));
        assert_eq!(debug(&checkpoint.text_encoder.config), debug(&sd15::text_encoder_config().unwrap()));
        assert_eq!(debug(&checkpoint.vae.unwrap().config), debug(&sd15::vae_config().unwrap()));
        let vae = vae_of(&sd15_file("vae", |_| {})).unwrap();
        assert_eq!(debug(&vae.config), debug(&sd15::vae_config().unwrap()));
        let controlnet = controlnet_of(&sd15_file("controlnet", |_| {})).unwrap();
        assert_eq!(debug(&controlnet.config), debug(&sd15::controlnet_config().unwrap()));
        // The same ControlNet without the control_model. prefix (as some re-packaged files).
        let bare = controlnet_of(&sd15_file("controlnet", |shapes| {
            *shapes = std::mem::take(shapes)
                .into_iter()
                .map(|(k, v)| (k.strip_prefix(CONTROLNET_PREFIX).unwrap().to_string(), v))
                .collect();
        }))
        .unwrap();
        assert_eq!(debug(&bare.config), debug(&controlnet.config));
        // The mapping of a few names diffusers' converter maps so too.
        let unet = &checkpoint.unet.tensors;
        for (diffusers, original) in [
            ("down_blocks.1.downsamplers.0.conv.weight", "model.diffusion_model.input_blocks.6.0.op.weight"),
            ("down_blocks.2.attentions.1.proj_in.weight", "model.diffusion_model.input_blocks.8.1.proj_in.weight"),
            ("up_blocks.0.upsamplers.0.conv.weight", "model.diffusion_model.output_blocks.2.1.conv.weight"),
            ("up_blocks.1.upsamplers.0.conv.bias", "model.diffusion_model.output_blocks.5.2.conv.bias"),
            (
                "up_blocks.3.resnets.2.conv_shortcut.weight",
                "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
            ),
            ("mid_block.resnets.1.time_emb_proj.weight", "model.diffusion_model.middle_block.2.emb_layers.1.weight"),
        ] {
            assert_eq!(unet.original_name(diffusers), Some(original), "{diffusers}");
        }
        assert_eq!(
            vae.tensors.original_name("decoder.up_blocks.0.upsamplers.0.conv.weight"),
            Some("decoder.up.3.upsample.conv.weight")
        );
        assert_eq!(vae.tensors.shape("encoder.mid_block.attentions.0.to_q.weight"), Some(&[512, 512][..]));
    }

    #[test]
    fn sd2_and_inpainting_shapes_are_refused() {
        let error = |change: fn(&mut BTreeMap<String, Vec<usize>>)| -> String {
            match checkpoint_of(&sd15_file("checkpoint", change), true) {
                Ok(_) => panic!("a changed SD1.5 checkpoint was accepted"),
                Err(e) => format!("{e:#}"),
            }
        };
        let err = error(|s| {
            s.insert("model.diffusion_model.input_blocks.0.0.weight".into(), vec![320, 9, 3, 3]);
        });
        assert!(err.contains("inpainting") && err.contains("9 input channels"), "{err}");
        let err = error(|s| {
            for (k, v) in s.iter_mut() {
                if k.ends_with("attn2.to_k.weight") || k.ends_with("attn2.to_v.weight") {
                    v[1] = 1024;
                }
            }
        });
        assert!(err.contains("2.x") && err.contains("1024"), "{err}");
        let err = error(|s| {
            s.insert("model.diffusion_model.label_emb.0.0.weight".into(), vec![1280, 2816]);
        });
        assert!(err.contains("label_emb"), "{err}");
        // A UNet with an odd number of resnets in a level.
        let err = error(|s| s.retain(|k, _| !k.starts_with("model.diffusion_model.input_blocks.2.")));
        assert!(err.contains("input blocks"), "{err}");
    }
}
