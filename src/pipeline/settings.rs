//! What one frame is computed with: the user's generation settings, and the plan they give.

/// Per-frame generation settings; everything here may change between frames.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameSettings {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub strength: f64,
    pub guidance_scale: f64,
    pub controlnet_scale: f64,
}

impl Default for FrameSettings {
    /// The original project's settings (see the technique note).
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 20,
            strength: 0.9,
            guidance_scale: 7.5,
            controlnet_scale: 0.7,
        }
    }
}

impl FrameSettings {
    /// Classifier-free guidance runs the UNet on an unconditional half only when it matters,
    /// as diffusers does (`guidance_scale > 1`).
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// What a frame's denoising loop will run: cross-frame state is only reusable between
/// frames with equal plans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramePlan {
    pub timesteps: Vec<usize>,
    pub width: usize,
    pub height: usize,
    /// UNet batch size: 2 with classifier-free guidance, else 1.
    pub batch: usize,
}
