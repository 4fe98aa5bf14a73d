//! The process-wide model registry: users (sessions, elements) that ask for the same models
//! share one loaded copy ([`SharedModels`]: weights, the text encoder, the [`super::Img2Img`]
//! with its CUDA graph caches).
//!
//! Models are the same when their settings are equal: the [`ModelSpec`] (model, ControlNet,
//! variant, LoRAs with their scales, VAE, tokenizer; a path that exists compares by its
//! canonical form),
//! the device (its location: `cpu`, `cuda:N`) and the dtype. A model instance id (DL Streamer's
//! `model-instance-id`) names a copy: users with the same non-empty id share one copy and must
//! ask for equal settings (else [`get`] fails naming the id and both settings); distinct ids
//! get distinct copies even for equal settings; the empty id shares by equal settings.
//!
//! The registry holds only [`Weak`] references: a copy is freed when its last user drops it,
//! and the next [`get`] loads it again. A load holds its own key's slot only, so users of one
//! key wait for its load while other keys load in parallel.
//!
//! What stays per user: the prompt-embedding cache ([`super::Stylizer`]), and in a
//! [`crate::session::VideoSession`] the cross-frame store, noise, anchors and settings.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use anyhow::{Result, anyhow, bail};
use candle_core::{DType, Device};

use super::loader::ModelSpec;
use super::stylizer::SharedModels;

/// Real loads so far (for tests: a shared model is loaded once).
static LOADS: AtomicUsize = AtomicUsize::new(0);

/// Models loaded from their files by [`get`] since the process started (a [`get`] answered
/// with an existing copy does not count).
pub fn loads() -> usize {
    LOADS.load(Ordering::SeqCst)
}

/// What makes two requests ask for the same models.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Settings {
    /// The spec's `Debug` text with its existing paths canonicalized (every field of the
    /// spec, including ones added later, takes part).
    spec: String,
    device: String,
    dtype: String,
}

impl Settings {
    fn new(spec: &ModelSpec, device: &Device, dtype: DType) -> Self {
        let mut spec = spec.clone();
        canonicalize(&mut spec.model);
        canonicalize(&mut spec.controlnet);
        for path in [&mut spec.vae, &mut spec.tokenizer].into_iter().flatten() {
            canonicalize(path);
        }
        for lora in &mut spec.loras {
            canonicalize(&mut lora.source);
        }
        let device = match device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            other => format!("{other:?}"),
        };
        Self { spec: format!("{spec:?}"), device, dtype: dtype.as_str().to_string() }
    }

    fn describe(&self) -> String {
        format!("{} on {} ({})", self.spec, self.device, self.dtype)
    }
}

/// A path that exists compares by its canonical form; anything else (a repo id) as written.
fn canonicalize(value: &mut String) {
    if value.is_empty() || !Path::new(value.as_str()).exists() {
        return;
    }
    if let Ok(path) = std::fs::canonicalize(value.as_str()) {
        *value = path.display().to_string();
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SlotKey {
    /// The empty instance id: shared by equal settings.
    Settings(Settings),
    /// A named instance.
    Instance(String),
}

/// One key's copy, if a user still holds it.
#[derive(Default)]
struct Slot {
    settings: Option<Settings>,
    models: Weak<SharedModels>,
}

static SLOTS: LazyLock<Mutex<HashMap<SlotKey, Arc<Mutex<Slot>>>>> = LazyLock::new(Default::default);

/// The models `spec` names on `device` in `dtype`: the copy another user holds under the same
/// key (the settings for an empty `instance_id`, else the id), or a new one loaded from the
/// files (counted by [`loads`]). An error when `instance_id` names a copy loaded with other
/// settings. The returned models' [`SharedModels::device`] is the device of the user that
/// loaded them (the same location as `device`): make tensors on that one.
pub fn get(spec: &ModelSpec, device: &Device, dtype: DType, instance_id: &str) -> Result<Arc<SharedModels>> {
    let settings = Settings::new(spec, device, dtype);
    let key = match instance_id {
        "" => SlotKey::Settings(settings.clone()),
        id => SlotKey::Instance(id.to_string()),
    };
    let slot = {
        let mut slots = SLOTS.lock().map_err(|_| anyhow!("the model registry was poisoned by a panic"))?;
        // Forget keys whose copy is gone and which no one is loading.
        slots.retain(|_, slot| {
            Arc::strong_count(slot) > 1 || slot.try_lock().map(|s| s.models.strong_count() > 0).unwrap_or(true)
        });
        slots.entry(key).or_default().clone()
    };
    // Held while loading: a second user of this key waits for the copy instead of loading it too.
    let mut slot = slot.lock().map_err(|_| anyhow!("a model registry slot was poisoned by a panic"))?;
    if let Some(models) = slot.models.upgrade() {
        match &slot.settings {
            Some(loaded) if *loaded == settings => return Ok(models),
            Some(loaded) => bail!(
                "model instance id {instance_id:?} is already used by models loaded with different settings: \
                 {} is loaded, {} is asked for (use the same settings or another model instance id)",
                loaded.describe(),
                settings.describe()
            ),
            None => bail!("model registry slot {instance_id:?} holds models without settings"),
        }
    }
    let _span = tracing::info_span!("registry_load", instance_id, device = %settings.device).entered();
    let models = Arc::new(SharedModels::load(spec, device, dtype)?);
    LOADS.fetch_add(1, Ordering::SeqCst);
    tracing::debug!("model registry: loaded {}", settings.describe());
    *slot = Slot { settings: Some(settings), models: Arc::downgrade(&models) };
    Ok(models)
}

/// Copies of the models held by some user now (for tests and diagnostics).
pub fn live_copies() -> usize {
    SLOTS
        .lock()
        .map(|slots| {
            slots.values().filter(|slot| slot.lock().map(|s| s.models.strong_count() > 0).unwrap_or(false)).count()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::LoraSpec;

    fn spec(model: &str) -> ModelSpec {
        ModelSpec {
            model: model.into(),
            controlnet: "c".into(),
            variant: None,
            loras: vec![],
            vae: None,
            tokenizer: None,
        }
    }

    #[test]
    fn settings_compare_every_field() {
        let cpu = Device::Cpu;
        let base = Settings::new(&spec("m"), &cpu, DType::F32);
        assert_eq!(base, Settings::new(&spec("m"), &cpu, DType::F32));
        assert_ne!(base, Settings::new(&spec("other"), &cpu, DType::F32));
        assert_ne!(base, Settings::new(&spec("m"), &cpu, DType::F16));
        let mut lora = spec("m");
        lora.loras.push(LoraSpec { source: "l".into(), scale: 1.0 });
        let mut scaled = lora.clone();
        scaled.loras[0].scale = 0.5;
        assert_ne!(Settings::new(&lora, &cpu, DType::F32), Settings::new(&scaled, &cpu, DType::F32));
        let mut vae = spec("m");
        vae.vae = Some("v".into());
        assert_ne!(base, Settings::new(&vae, &cpu, DType::F32));
        let mut variant = spec("m");
        variant.variant = Some("fp16".into());
        assert_ne!(base, Settings::new(&variant, &cpu, DType::F32));
        let mut tokenizer = spec("m");
        tokenizer.tokenizer = Some("t".into());
        assert_ne!(base, Settings::new(&tokenizer, &cpu, DType::F32));
    }

    #[test]
    fn existing_paths_compare_canonically() {
        let dir = std::env::temp_dir();
        let plain = dir.display().to_string();
        let dotted = dir.join(".").display().to_string();
        let cpu = Device::Cpu;
        assert_eq!(Settings::new(&spec(&plain), &cpu, DType::F32), Settings::new(&spec(&dotted), &cpu, DType::F32));
    }
}
