//! Writing single-file checkpoints for the tests: the tiny models in the original layout
//! (`tests/fixtures/single-file/layout.json`, made and checked by diffusers in
//! tests/reference/make_singlefile_fixtures.py) and fakes of other layouts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::fixtures;

/// One tensor to write: safetensors dtype name, shape, raw little-endian bytes.
pub struct Raw {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Writes a safetensors file (header padded to 8 bytes, as the format recommends).
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Raw>, metadata: &BTreeMap<String, String>) {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0;
    for (name, t) in tensors {
        header.insert(
            name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.bytes.len()]}),
        );
        offset += t.bytes.len();
    }
    let mut text = serde_json::to_string(&header).unwrap().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    for t in tensors.values() {
        out.extend(&t.bytes);
    }
    std::fs::write(path, out).unwrap();
}

pub fn f32_tensor(shape: &[usize]) -> Raw {
    let n: usize = shape.iter().product();
    Raw { dtype: "F32".into(), shape: shape.to_vec(), bytes: vec![0; 4 * n] }
}

/// Writes a fake file holding zero-filled f32 tensors of these names and shapes.
pub fn fake(dir: &Path, name: &str, tensors: &[(&str, &[usize])]) -> PathBuf {
    let path = dir.join(name);
    let tensors = tensors.iter().map(|(k, s)| (k.to_string(), f32_tensor(s))).collect();
    write_safetensors(&path, &tensors, &BTreeMap::new());
    path
}

/// What to change when writing a layout.
#[derive(Default)]
pub struct Changes<'a> {
    /// Original names whose values are negated.
    pub negate: &'a [&'a str],
    /// Metadata keys left out.
    pub drop_metadata: &'a [&'a str],
}

/// Writes `kind` ("checkpoint", "controlnet", "vae") of layout.json as a single file.
pub fn write_layout(kind: &str, dir: &Path, changes: &Changes) -> PathBuf {
    let layout: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("single-file/layout.json")).unwrap()).unwrap();
    let entry = &layout[kind];
    let mut sources: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for item in entry["tensors"].as_array().unwrap() {
        let original = item[0].as_str().unwrap();
        let source = item[1].as_str().unwrap();
        let name = item[2].as_str().unwrap();
        let shape: Vec<usize> = item[3].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let raw = if source == "arange" {
            let n: usize = shape.iter().product();
            Raw { dtype: "I64".into(), shape, bytes: (0..n as i64).flat_map(i64::to_le_bytes).collect() }
        } else {
            let bytes =
                sources.entry(source.to_string()).or_insert_with(|| std::fs::read(fixtures().join(source)).unwrap());
            let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
            let view = st.tensor(name).unwrap();
            assert_eq!(view.shape().iter().product::<usize>(), shape.iter().product::<usize>(), "{original}");
            let mut data = view.data().to_vec();
            if changes.negate.contains(&original) {
                assert_eq!(view.dtype(), safetensors::Dtype::F16);
                for pair in data.chunks_mut(2) {
                    pair[1] ^= 0x80;
                }
            }
            Raw { dtype: format!("{:?}", view.dtype()), shape, bytes: data }
        };
        tensors.insert(original.to_string(), raw);
    }
    let metadata = entry["metadata"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| !changes.drop_metadata.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let path = dir.join(format!("{kind}.safetensors"));
    write_safetensors(&path, &tensors, &metadata);
    path
}
