//! Loading per-head Q/K/V activations from safetensors files in the
//! fixture format: tensors `layer{L}.seq{S}.{q,k,v}` (and optionally
//! `o_exact`), `[batch, seq, heads, head_dim]`, f32/f16/bf16, with
//! `__metadata__` keys `causal` ("true"/"false"), `num_heads`, `num_kv_heads`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use distr_attention_core::Layout;
use safetensors::{Dtype, SafeTensors};

/// Why a file could not be used.
#[derive(Debug)]
pub struct LoadError(pub String);

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LoadError {}

/// One attention call: a layer of a sequence.
#[derive(Clone, Debug)]
pub struct Sample {
    /// `layer{L}.seq{S}`.
    pub name: String,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// The exact output shipped with the file, if any.
    pub o_exact: Option<Vec<f32>>,
    pub q_layout: Layout,
    pub k_layout: Layout,
    pub v_layout: Layout,
}

/// All samples of one file, with the mask the file declares.
#[derive(Clone, Debug)]
pub struct Activations {
    pub path: PathBuf,
    pub causal: bool,
    pub samples: Vec<Sample>,
}

/// The two real-data files bundled with the repository (`tests/data/`).
pub fn bundled_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("data");
    ["minilm_l6_dev.safetensors", "smollm2_135m_dev.safetensors"].iter().map(|f| dir.join(f)).collect()
}

fn to_f32(view: &safetensors::tensor::TensorView<'_>, name: &str) -> Result<Vec<f32>, LoadError> {
    let bytes = view.data();
    let out = match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => {
            bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        Dtype::BF16 => {
            bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        other => return Err(LoadError(format!("{name}: dtype {other:?} is not f32, f16 or bf16"))),
    };
    Ok(out)
}

fn layout_of(view: &safetensors::tensor::TensorView<'_>, name: &str) -> Result<Layout, LoadError> {
    match *view.shape() {
        [b, s, h, d] if b * s * h * d > 0 => Ok(Layout::contiguous(b, s, h, d)),
        ref shape => Err(LoadError(format!(
            "{name}: shape {shape:?} is not a non-empty [batch, seq, heads, head_dim]"
        ))),
    }
}

impl Activations {
    /// Reads every `layer*.seq*` group that has q, k and v. `causal` comes
    /// from the metadata unless `causal_override` is given.
    pub fn load(path: &Path, causal_override: Option<bool>) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|e| LoadError(format!("{}: {e}", path.display())))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| LoadError(format!("{}: not a safetensors file: {e}", path.display())))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| LoadError(format!("{}: not a safetensors file: {e}", path.display())))?;
        let meta_causal = meta.metadata().as_ref().and_then(|m| m.get("causal")).map(|s| s == "true");
        let causal = causal_override.or(meta_causal).unwrap_or(false);

        // Group tensor names by their prefix before `.q` / `.k` / `.v` / `.o_exact`.
        let mut prefixes = BTreeMap::new();
        for name in st.names() {
            if let Some((prefix, "q")) = name.rsplit_once('.') {
                prefixes.insert(natural_key(prefix), prefix.to_string());
            }
        }
        let mut samples = Vec::new();
        for prefix in prefixes.into_values() {
            let get = |suffix: &str| st.tensor(&format!("{prefix}.{suffix}")).ok();
            let (Some(q), Some(k), Some(v)) = (get("q"), get("k"), get("v")) else {
                continue;
            };
            let o_exact = match get("o_exact") {
                Some(o) => Some(to_f32(&o, &format!("{prefix}.o_exact"))?),
                None => None,
            };
            samples.push(Sample {
                q_layout: layout_of(&q, &format!("{prefix}.q"))?,
                k_layout: layout_of(&k, &format!("{prefix}.k"))?,
                v_layout: layout_of(&v, &format!("{prefix}.v"))?,
                q: to_f32(&q, &format!("{prefix}.q"))?,
                k: to_f32(&k, &format!("{prefix}.k"))?,
                v: to_f32(&v, &format!("{prefix}.v"))?,
                o_exact,
                name: prefix,
            });
        }
        if samples.is_empty() {
            return Err(LoadError(format!(
                "{}: no tensors named <prefix>.q, <prefix>.k, <prefix>.v",
                path.display()
            )));
        }
        Ok(Activations { path: path.to_path_buf(), causal, samples })
    }
}

/// Sorts `layer10` after `layer9`: digit runs compare as numbers.
fn natural_key(s: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            let mut n = c.to_digit(10).unwrap_or(0) as u64;
            while let Some(d) = chars.peek().and_then(|c| c.to_digit(10)) {
                n = n.saturating_mul(10).saturating_add(d as u64);
                chars.next();
            }
            out.push((std::mem::take(&mut text), n));
        } else {
            text.push(c);
        }
    }
    out.push((text, u64::MAX));
    out
}
