//! The planner's per-head tables: JSON as written by the `plan_heads` command
//! (`examples/plan_heads.rs`), read back so that an engine can run each layer
//! with the group sizes chosen for it.
//!
//! The format (the fields this module reads; others are ignored):
//!
//! ```json
//! {
//!   "grouping": "Similarity",          // Lsh | Similarity | KeyWeighted
//!   "block_rows": 64,
//!   "files": [
//!     {"file": "calib/model.safetensors", "layers": [
//!       {"layer": "layer0", "group_sizes": [1, 2, 4, 1],
//!        "heads": [{"head": 0, "group_size": 1, ...}, ...]}
//!     ]}
//!   ]
//! }
//! ```

use core::ffi::{c_char, CStr};
use core::mem::size_of;
use core::slice;

use distr_attention_core::GroupingMode;
use serde_json::Value;

use crate::api::named_buffer;
use crate::error::{boundary, Failure, FfiResult};
use crate::status::da_status;
use crate::types::{check_disjoint, da_config, da_grouping, ByteRange, MAX_CONFIG_SIZE};

/// What a table says about one layer.
#[derive(Debug, PartialEq)]
pub(crate) struct Entry {
    pub(crate) group_sizes: Vec<u32>,
    /// The table's grouping mode and block rows (the planner's settings), if given.
    pub(crate) grouping: Option<GroupingMode>,
    pub(crate) block_rows: Option<usize>,
}

fn bad(message: impl core::fmt::Display) -> Failure {
    Failure::new(da_status::BadTable, format!("table: {message}"))
}

fn parse_grouping(v: &Value) -> FfiResult<GroupingMode> {
    match v.as_str() {
        Some("Lsh" | "lsh") => Ok(GroupingMode::Lsh),
        Some("Similarity" | "similarity") => Ok(GroupingMode::Similarity),
        Some("KeyWeighted" | "key-weighted" | "key_weighted") => Ok(GroupingMode::KeyWeighted),
        _ => Err(bad(format!("\"grouping\" is {v}, not Lsh, Similarity or KeyWeighted"))),
    }
}

/// Whether a table's `file` entry (a path as given to the planner) is the file
/// the caller names: the same string, or a path ending in it after a separator.
fn file_matches(entry: &str, wanted: &str) -> bool {
    entry == wanted
        || entry.strip_suffix(wanted).is_some_and(|head| head.ends_with('/') || head.ends_with('\\'))
}

/// Finds the entry of `layer` (in the file `file`, if given) in a table.
pub(crate) fn lookup(text: &[u8], file: Option<&str>, layer: &str) -> FfiResult<Entry> {
    let root: Value = serde_json::from_slice(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let top = root.as_object().ok_or_else(|| bad("the top level is not an object"))?;
    let grouping = top.get("grouping").map(parse_grouping).transpose()?;
    let block_rows = match top.get("block_rows") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|&x| x >= 1)
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| bad(format!("\"block_rows\" is {v}, not a positive integer")))?,
        ),
    };
    let files = top.get("files").and_then(Value::as_array).ok_or_else(|| bad("no \"files\" array"))?;
    let mut file_names = Vec::new();
    let mut found = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let name = f
            .get("file")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("files[{i}] has no \"file\" string")))?;
        let layers = f
            .get("layers")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(format!("files[{i}] ({name}) has no \"layers\" array")))?;
        file_names.push(name);
        if file.is_some_and(|wanted| !file_matches(name, wanted)) {
            continue;
        }
        for (j, l) in layers.iter().enumerate() {
            let layer_name = l
                .get("layer")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{name}: layers[{j}] has no \"layer\" string")))?;
            if layer_name == layer {
                found.push((name, l));
            }
        }
    }
    let (name, entry) = match found.as_slice() {
        [one] => *one,
        [] => {
            let message = match file {
                Some(wanted) if !file_names.iter().any(|f| file_matches(f, wanted)) => {
                    format!("file \"{wanted}\" is not in the table (files: {})", file_names.join(", "))
                }
                Some(wanted) => format!("layer \"{layer}\" is not in the table under file \"{wanted}\""),
                None => format!("layer \"{layer}\" is not in the table"),
            };
            return Err(Failure::new(da_status::NotFound, message));
        }
        many => {
            let names: Vec<&str> = many.iter().map(|(f, _)| *f).collect();
            return Err(Failure::new(
                da_status::InvalidArgument,
                format!(
                    "layer \"{layer}\" has {} entries in the table (files {}): name the file",
                    many.len(),
                    names.join(", ")
                ),
            ));
        }
    };
    let sizes = entry
        .get("group_sizes")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("{name}: layer \"{layer}\" has no \"group_sizes\" array")))?;
    if sizes.is_empty() {
        return Err(bad(format!("{name}: layer \"{layer}\" has an empty \"group_sizes\" array")));
    }
    let mut group_sizes = Vec::with_capacity(sizes.len());
    for (h, g) in sizes.iter().enumerate() {
        let g = g.as_u64().filter(|&g| g >= 1).and_then(|g| u32::try_from(g).ok()).ok_or_else(|| {
            bad(format!("{name}: layer \"{layer}\": group_sizes[{h}] is {g}, not a positive 32-bit integer"))
        })?;
        group_sizes.push(g);
    }
    // The per-head records the planner writes next to the sizes must agree with them.
    if let Some(heads) = entry.get("heads") {
        let heads = heads
            .as_array()
            .ok_or_else(|| bad(format!("{name}: layer \"{layer}\": \"heads\" is not an array")))?;
        let agree = heads.len() == group_sizes.len()
            && heads.iter().zip(&group_sizes).enumerate().all(|(h, (rec, &g))| {
                rec.get("group_size").and_then(Value::as_u64) == Some(g as u64)
                    && rec.get("head").is_none_or(|x| x.as_u64() == Some(h as u64))
            });
        if !agree {
            return Err(bad(format!(
                "{name}: layer \"{layer}\": the \"heads\" records disagree with \"group_sizes\""
            )));
        }
    }
    Ok(Entry { group_sizes, grouping, block_rows })
}

/// A NUL-terminated UTF-8 argument and the bytes it occupies (NUL included).
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string.
unsafe fn c_str<'a>(ptr: *const c_char, name: &'static str) -> FfiResult<Option<(&'a str, ByteRange)>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and NUL-terminated per the contract.
    let s = unsafe { CStr::from_ptr(ptr) };
    let range = ByteRange::of_unaligned(ptr.cast(), s.to_bytes_with_nul().len(), 1, name)?;
    let s = s
        .to_str()
        .map_err(|e| Failure::new(da_status::InvalidArgument, format!("{name}: not UTF-8 ({e})")))?;
    Ok(Some((s, range)))
}

/// Reads the group sizes of one layer from a table into the caller's buffers.
///
/// # Safety
/// The contract of `da_load_group_sizes` for everything but the table, which
/// `text` holds (`text_range`: where the caller's copy is, if it is theirs).
#[allow(clippy::too_many_arguments)]
unsafe fn load(
    text: &[u8],
    read: &mut Vec<ByteRange>,
    file: *const c_char,
    layer: *const c_char,
    group_sizes: *mut u32,
    capacity: usize,
    num_heads: *mut usize,
    config: *mut da_config,
) -> FfiResult {
    // SAFETY (the strings): forwarded contract.
    let (layer, layer_range) = unsafe { c_str(layer, "layer")? }
        .ok_or_else(|| Failure::new(da_status::NullPointer, "layer: pointer is NULL"))?;
    read.push(layer_range);
    let file = match unsafe { c_str(file, "file")? } {
        Some((file, range)) => {
            read.push(range);
            Some(file)
        }
        None => None,
    };
    let mut written = vec![ByteRange::of_buffer(num_heads.cast_const(), 1, "num_heads")?];
    let entry = lookup(text, file, layer)?;
    let n = entry.group_sizes.len();
    if group_sizes.is_null() {
        if capacity != 0 {
            return Err(Failure::new(
                da_status::NullPointer,
                format!("group_sizes: pointer is NULL but capacity is {capacity}"),
            ));
        }
    } else {
        written.push(named_buffer(group_sizes, capacity, n, "group_sizes")?);
    }
    let settings = if config.is_null() {
        None
    } else {
        // SAFETY: a config starts with its size; the caller provides at least that.
        let struct_size = unsafe { config.cast::<usize>().read_unaligned() };
        let known = size_of::<da_config>();
        if !(known..=MAX_CONFIG_SIZE).contains(&struct_size) {
            return Err(Failure::new(
                da_status::InvalidArgument,
                format!(
                    "config: struct_size is {struct_size}, not in {known}..={MAX_CONFIG_SIZE} \
                     (initialise the config with da_config_default)"
                ),
            ));
        }
        written.push(ByteRange::of_unaligned(config.cast_const().cast(), struct_size, 1, "config")?);
        let (Some(grouping), Some(block_rows)) = (entry.grouping, entry.block_rows) else {
            return Err(bad("no \"grouping\" and \"block_rows\" at the top level to set the config from"));
        };
        Some((grouping, block_rows))
    };
    check_disjoint(&written, read)?;

    // SAFETY (the writes): checked pointers, alignment and extents, disjoint
    // from each other and from every input.
    if !group_sizes.is_null() {
        unsafe { slice::from_raw_parts_mut(group_sizes, n) }.copy_from_slice(&entry.group_sizes);
    }
    unsafe { num_heads.write(n) };
    if let Some((grouping, block_rows)) = settings {
        // Field by field, unaligned: the other fields stay as the caller set them.
        unsafe {
            core::ptr::addr_of_mut!((*config).block_rows).write_unaligned(block_rows);
            core::ptr::addr_of_mut!((*config).grouping)
                .write_unaligned(da_grouping::of_mode(grouping) as u32);
        }
    }
    Ok(())
}

/// Reads the per-head group sizes of one layer from a table the planner wrote
/// (`cargo run --release --example plan_heads -- ... --out table.json`), given
/// as JSON text.
///
/// * `json`: `json_len` bytes of UTF-8 JSON (no NUL needed).
/// * `layer`: the layer's name in the table (e.g. "layer3"); `file`: NULL, or
///   the calibration file the layer belongs to, as written in the table or its
///   last path components (e.g. "model.safetensors"). Without `file` the layer
///   must be in exactly one file of the table (otherwise
///   `DA_STATUS_INVALID_ARGUMENT`); a layer or file that is not there gives
///   `DA_STATUS_NOT_FOUND`.
/// * `*num_heads` receives the number of heads of the entry; `group_sizes` holds
///   `capacity` entries and receives that many sizes (one per query head, ready
///   for `da_config.group_sizes`), or is NULL with `capacity` 0 to ask for the
///   count only.
/// * `config`: NULL, or a config (from `da_config_default`) whose `block_rows`
///   and `grouping` are set to the planner's (the settings under which the
///   errors were measured); its other fields are left alone.
///
/// A malformed table, or an entry with a size that is not a positive 32-bit
/// integer, gives `DA_STATUS_BAD_TABLE`. Nothing is written unless the call
/// succeeds; the outputs must not overlap each other nor the inputs.
///
/// # Safety
/// `json` NULL or `json_len` readable bytes; `layer` and `file` NULL or
/// NUL-terminated strings; `group_sizes` NULL or `capacity` writable entries;
/// `num_heads` NULL or writable; `config` NULL or a config of `struct_size`
/// writable bytes.
#[no_mangle]
pub unsafe extern "C" fn da_load_group_sizes(
    json: *const c_char,
    json_len: usize,
    file: *const c_char,
    layer: *const c_char,
    group_sizes: *mut u32,
    capacity: usize,
    num_heads: *mut usize,
    config: *mut da_config,
) -> da_status {
    boundary(|| {
        let range = ByteRange::of_unaligned(json.cast(), json_len, 1, "json")?;
        // SAFETY: checked non-NULL with an extent in the address space; readable per the contract.
        let text = unsafe { slice::from_raw_parts(json.cast::<u8>(), json_len) };
        // SAFETY: forwarded contract.
        unsafe { load(text, &mut vec![range], file, layer, group_sizes, capacity, num_heads, config) }
    })
}

/// `da_load_group_sizes` on the table in the file at `path` (a NUL-terminated
/// path in the system's encoding). A file that cannot be read gives
/// `DA_STATUS_IO_ERROR` with the system's reason.
///
/// # Safety
/// `path` NULL or a NUL-terminated string; the rest as for `da_load_group_sizes`.
#[no_mangle]
pub unsafe extern "C" fn da_load_group_sizes_file(
    path: *const c_char,
    file: *const c_char,
    layer: *const c_char,
    group_sizes: *mut u32,
    capacity: usize,
    num_heads: *mut usize,
    config: *mut da_config,
) -> da_status {
    boundary(|| {
        if path.is_null() {
            return Err(Failure::new(da_status::NullPointer, "path: pointer is NULL"));
        }
        // SAFETY: non-NULL and NUL-terminated per the contract.
        let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
        let range = ByteRange::of_unaligned(path.cast(), bytes.len() + 1, 1, "path")?;
        let os_path = path_of(bytes)?;
        let text = std::fs::read(&os_path).map_err(|e| {
            Failure::new(da_status::IoError, format!("path: cannot read {}: {e}", os_path.display()))
        })?;
        // SAFETY: forwarded contract.
        unsafe { load(&text, &mut vec![range], file, layer, group_sizes, capacity, num_heads, config) }
    })
}

#[cfg(unix)]
fn path_of(bytes: &[u8]) -> FfiResult<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    Ok(std::ffi::OsStr::from_bytes(bytes).into())
}

#[cfg(not(unix))]
fn path_of(bytes: &[u8]) -> FfiResult<std::path::PathBuf> {
    core::str::from_utf8(bytes)
        .map(Into::into)
        .map_err(|e| Failure::new(da_status::InvalidArgument, format!("path: not UTF-8 ({e})")))
}
