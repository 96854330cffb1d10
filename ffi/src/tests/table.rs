//! Reading the planner's JSON tables through the C ABI: lookups by layer and
//! file, the config settings, and every status path.

use core::ffi::c_char;
use std::ffi::CString;

use super::*;

/// A table in the format `examples/plan_heads.rs` writes: two files with
/// overlapping layer names.
const TABLE: &str = r#"{
  "target": {"max_error": 0.2},
  "grouping": "KeyWeighted",
  "block_rows": 32,
  "files": [
    {"file": "/data/calib/minilm.safetensors", "layers": [
      {"layer": "layer0", "group_sizes": [1, 2, 4, 1], "flop_saving": 0.1234, "target_met": true, "heads": [{"head": 0, "group_size": 1, "measured_error": 0.00000, "estimated_error": 0.00000}, {"head": 1, "group_size": 2, "measured_error": 0.10000, "estimated_error": 0.09000}, {"head": 2, "group_size": 4, "measured_error": 0.19000, "estimated_error": 0.20000}, {"head": 3, "group_size": 1, "measured_error": 0.00000, "estimated_error": 0.00000}]},
      {"layer": "layer1", "group_sizes": [8, 8], "flop_saving": 0.4, "target_met": true, "heads": [{"head": 0, "group_size": 8, "measured_error": 0.1, "estimated_error": 0.1}, {"head": 1, "group_size": 8, "measured_error": 0.1, "estimated_error": 0.1}]}
    ]},
    {"file": "/data/calib/smollm.safetensors", "layers": [
      {"layer": "layer0", "group_sizes": [2, 2, 2], "flop_saving": 0.2, "target_met": true, "heads": [{"head": 0, "group_size": 2, "measured_error": 0.1, "estimated_error": 0.1}, {"head": 1, "group_size": 2, "measured_error": 0.1, "estimated_error": 0.1}, {"head": 2, "group_size": 2, "measured_error": 0.1, "estimated_error": 0.1}]}
    ]}
  ]
}
"#;

/// `load` without a config.
fn find(text: &str, file: Option<&str>, layer: &str, capacity: usize) -> (da_status, Vec<u32>, usize) {
    load(text, file, layer, capacity, None)
}

/// `da_load_group_sizes` on `text`; `capacity` entries; optionally a config to fill.
fn load(
    text: &str,
    file: Option<&str>,
    layer: &str,
    capacity: usize,
    config: Option<&mut da_config>,
) -> (da_status, Vec<u32>, usize) {
    let file = file.map(|f| CString::new(f).unwrap());
    let layer = CString::new(layer).unwrap();
    let mut sizes = vec![0u32; capacity];
    let mut n = usize::MAX;
    let cfg = config.map_or(null_mut(), |c| c as *mut da_config);
    // SAFETY: valid strings and buffers of the lengths given.
    let s = unsafe {
        da_load_group_sizes(
            text.as_ptr().cast(),
            text.len(),
            file.as_ref().map_or(null(), |f| f.as_ptr()),
            layer.as_ptr(),
            if capacity == 0 { null_mut() } else { sizes.as_mut_ptr() },
            capacity,
            &mut n,
            cfg,
        )
    };
    (s, sizes, n)
}

#[test]
fn lookups_by_layer_and_file() {
    let (s, sizes, n) = find(TABLE, Some("minilm.safetensors"), "layer0", 6);
    expect(s, da_status::Ok, "");
    assert_eq!((n, &sizes[..]), (4, &[1, 2, 4, 1, 0, 0][..]));
    // The full path, a longer suffix, and a layer that is in one file only.
    for file in ["/data/calib/smollm.safetensors", "calib/smollm.safetensors", "smollm.safetensors"] {
        let (s, sizes, n) = find(TABLE, Some(file), "layer0", 3);
        expect(s, da_status::Ok, "");
        assert_eq!((n, sizes), (3, vec![2, 2, 2]));
    }
    let (s, sizes, n) = find(TABLE, None, "layer1", 2);
    expect(s, da_status::Ok, "");
    assert_eq!((n, sizes), (2, vec![8, 8]));
    // The count alone.
    let (s, _, n) = find(TABLE, Some("minilm.safetensors"), "layer0", 0);
    expect(s, da_status::Ok, "");
    assert_eq!(n, 4);
}

#[test]
fn lookups_fill_the_config() {
    let mut cfg = da_config { seed: 5, group_size: 8, ..config() };
    let (s, sizes, n) = load(TABLE, Some("minilm.safetensors"), "layer0", 4, Some(&mut cfg));
    expect(s, da_status::Ok, "");
    assert_eq!((cfg.block_rows, cfg.grouping), (32, da_grouping::KeyWeighted as u32));
    assert_eq!(
        (cfg.seed, cfg.group_size, cfg.struct_size),
        (5, 8, size_of::<da_config>()),
        "other fields kept"
    );
    // The loaded sizes run as per-head sizes of that config.
    cfg.group_sizes = sizes.as_ptr();
    cfg.num_group_sizes = n;
    let p = Problem::new(1, 40, 40, 4, 2, 16, 16);
    let mut out = vec![0f32; p.out_len()];
    expect(forward(&Ctx::new(), &cfg, &p.descs(&mut out), None, None), da_status::Ok, "");
    // Lower-case spellings of the grouping are accepted too.
    let lower = TABLE.replace("\"KeyWeighted\"", "\"similarity\"");
    let (s, _, _) = load(&lower, None, "layer1", 2, Some(&mut cfg));
    expect(s, da_status::Ok, "");
    assert_eq!(cfg.grouping, da_grouping::Similarity as u32);
}

#[test]
fn lookups_from_a_file() {
    let dir = std::env::temp_dir().join(format!("da-table-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("table.json");
    std::fs::write(&path, TABLE).unwrap();
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    let mut sizes = [0u32; 4];
    let mut n = 0usize;
    let mut cfg = config();
    // SAFETY: valid strings and buffers.
    let s = unsafe {
        da_load_group_sizes_file(
            cpath.as_ptr(),
            c"minilm.safetensors".as_ptr(),
            c"layer0".as_ptr(),
            sizes.as_mut_ptr(),
            4,
            &mut n,
            &mut cfg,
        )
    };
    expect(s, da_status::Ok, "");
    assert_eq!((sizes, n, cfg.block_rows), ([1, 2, 4, 1], 4, 32));
    let missing = CString::new(dir.join("missing.json").to_str().unwrap()).unwrap();
    // SAFETY: as above.
    let s = unsafe {
        da_load_group_sizes_file(
            missing.as_ptr(),
            null(),
            c"layer0".as_ptr(),
            null_mut(),
            0,
            &mut n,
            null_mut(),
        )
    };
    expect(s, da_status::IoError, "path: cannot read");
    assert!(message().contains("missing.json"), "{}", message());
    // SAFETY: NULL path.
    let s = unsafe {
        da_load_group_sizes_file(null(), null(), c"layer0".as_ptr(), null_mut(), 0, &mut n, null_mut())
    };
    expect(s, da_status::NullPointer, "path: pointer is NULL");
    // A directory is not a table either.
    let cdir = CString::new(dir.to_str().unwrap()).unwrap();
    // SAFETY: valid strings.
    let s = unsafe {
        da_load_group_sizes_file(cdir.as_ptr(), null(), c"layer0".as_ptr(), null_mut(), 0, &mut n, null_mut())
    };
    expect(s, da_status::IoError, "path: cannot read");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lookups_that_fail() {
    expect(
        find(TABLE, None, "layer0", 4).0,
        da_status::InvalidArgument,
        "layer \"layer0\" has 2 entries in the table (files /data/calib/minilm.safetensors, /data/calib/smollm.safetensors): name the file",
    );
    expect(find(TABLE, None, "layer7", 4).0, da_status::NotFound, "layer \"layer7\" is not in the table");
    expect(
        find(TABLE, Some("smollm.safetensors"), "layer1", 4).0,
        da_status::NotFound,
        "layer \"layer1\" is not in the table under file \"smollm.safetensors\"",
    );
    // A suffix must end at a path separator.
    expect(
        find(TABLE, Some("llm.safetensors"), "layer0", 4).0,
        da_status::NotFound,
        "file \"llm.safetensors\" is not in the table (files: /data/calib/minilm.safetensors, /data/calib/smollm.safetensors)",
    );
    expect(
        find(TABLE, Some("minilm.safetensors"), "layer0", 3).0,
        da_status::BufferTooSmall,
        "group_sizes: buffer holds 3 elements, 4 needed",
    );

    // Malformed tables.
    let bad: [(String, &str); 12] = [
        ("{\"files\": [".into(), "not valid JSON"),
        ("[1, 2]".into(), "the top level is not an object"),
        ("{\"grouping\": \"Lsh\"}".into(), "no \"files\" array"),
        (r#"{"files": [{"layers": []}]}"#.into(), "files[0] has no \"file\" string"),
        (r#"{"files": [{"file": "minilm.safetensors"}]}"#.into(), "files[0] (minilm.safetensors) has no \"layers\" array"),
        (
            r#"{"files": [{"file": "minilm.safetensors", "layers": [{"group_sizes": [2]}]}]}"#.into(),
            "minilm.safetensors: layers[0] has no \"layer\" string",
        ),
        (
            r#"{"files": [{"file": "minilm.safetensors", "layers": [{"layer": "layer0"}]}]}"#.into(),
            "has no \"group_sizes\" array",
        ),
        (
            r#"{"files": [{"file": "minilm.safetensors", "layers": [{"layer": "layer0", "group_sizes": []}]}]}"#.into(),
            "empty \"group_sizes\"",
        ),
        (TABLE.replace("[1, 2, 4, 1]", "[1, 0, 4, 1]"), "group_sizes[1] is 0, not a positive 32-bit integer"),
        (TABLE.replace("[1, 2, 4, 1]", "[1, 2, 4294967296, 1]"), "group_sizes[2] is 4294967296"),
        (TABLE.replace("[1, 2, 4, 1]", "[1, 2, 4.5, 1]"), "group_sizes[2] is 4.5"),
        (
            TABLE.replace("[1, 2, 4, 1]", "[1, 2, 8, 1]"),
            "the \"heads\" records disagree with \"group_sizes\"",
        ),
    ];
    for (text, needle) in bad {
        let (s, sizes, n) = find(&text, Some("minilm.safetensors"), "layer0", 4);
        expect(s, da_status::BadTable, needle);
        assert_eq!((sizes, n), (vec![0; 4], usize::MAX), "nothing written on error");
    }
    // The top-level settings are checked when present.
    for (text, needle) in [
        (
            TABLE.replace("\"KeyWeighted\"", "\"Random\""),
            "\"grouping\" is \"Random\", not Lsh, Similarity or KeyWeighted",
        ),
        (
            TABLE.replace("\"block_rows\": 32", "\"block_rows\": 0"),
            "\"block_rows\" is 0, not a positive integer",
        ),
    ] {
        expect(find(&text, Some("minilm.safetensors"), "layer0", 4).0, da_status::BadTable, needle);
    }
    // ... and needed to fill a config.
    let bare = TABLE.replace("\"grouping\": \"KeyWeighted\",", "");
    let mut cfg = config();
    expect(find(&bare, Some("minilm.safetensors"), "layer0", 4).0, da_status::Ok, "");
    expect(
        load(&bare, Some("minilm.safetensors"), "layer0", 4, Some(&mut cfg)).0,
        da_status::BadTable,
        "no \"grouping\" and \"block_rows\" at the top level",
    );
    assert_eq!(cfg.block_rows, 64, "the config is untouched on error");
    let mut small = da_config { struct_size: 8, ..config() };
    expect(
        load(TABLE, Some("minilm.safetensors"), "layer0", 4, Some(&mut small)).0,
        da_status::InvalidArgument,
        "config: struct_size is 8",
    );
}

#[test]
fn lookup_pointer_statuses() {
    let mut sizes = [0u32; 8];
    let mut n = 0usize;
    let text = TABLE.as_bytes();
    let t = text.as_ptr().cast::<c_char>();
    let layer = c"layer1".as_ptr();
    // SAFETY (every call): pointers valid, NULL, or rejected before use.
    unsafe {
        let s = da_load_group_sizes(null(), 10, null(), layer, sizes.as_mut_ptr(), 8, &mut n, null_mut());
        expect(s, da_status::NullPointer, "json: pointer is NULL");
        let s = da_load_group_sizes(t, text.len(), null(), null(), sizes.as_mut_ptr(), 8, &mut n, null_mut());
        expect(s, da_status::NullPointer, "layer: pointer is NULL");
        let s =
            da_load_group_sizes(t, text.len(), null(), layer, sizes.as_mut_ptr(), 8, null_mut(), null_mut());
        expect(s, da_status::NullPointer, "num_heads: pointer is NULL");
        let s = da_load_group_sizes(t, text.len(), null(), layer, null_mut(), 8, &mut n, null_mut());
        expect(s, da_status::NullPointer, "group_sizes: pointer is NULL but capacity is 8");
        let odd = sizes.as_mut_ptr().cast::<u8>().wrapping_add(1).cast::<u32>();
        let s = da_load_group_sizes(t, text.len(), null(), layer, odd, 4, &mut n, null_mut());
        expect(s, da_status::MisalignedPointer, "group_sizes: pointer");
        let s = da_load_group_sizes(t, usize::MAX, null(), layer, sizes.as_mut_ptr(), 8, &mut n, null_mut());
        expect(s, da_status::SizeOverflow, "json: 18446744073709551615 elements");
        // Outputs over each other or over the text.
        let over = sizes.as_mut_ptr().cast::<usize>();
        let s = da_load_group_sizes(t, text.len(), null(), layer, sizes.as_mut_ptr(), 8, over, null_mut());
        expect(
            s,
            da_status::OverlappingBuffers,
            "num_heads: the buffer written overlaps the buffer of group_sizes",
        );
        let mut copy = TABLE.as_bytes().to_vec();
        let len = copy.len();
        let inside = copy.as_mut_ptr().cast::<u32>();
        let s = da_load_group_sizes(copy.as_ptr().cast(), len, null(), layer, inside, 2, &mut n, null_mut());
        expect(
            s,
            da_status::OverlappingBuffers,
            "group_sizes: the buffer written overlaps the buffer of json",
        );
        let mut cfg = config();
        let over_cfg = (&mut cfg as *mut da_config).cast::<u32>();
        let s = da_load_group_sizes(t, text.len(), null(), layer, over_cfg, 2, &mut n, &mut cfg);
        expect(
            s,
            da_status::OverlappingBuffers,
            "group_sizes: the buffer written overlaps the buffer of config",
        );
        assert_eq!(cfg.struct_size, size_of::<da_config>());
        // Names that are not UTF-8.
        let bad = [0xffu8, 0];
        let s = da_load_group_sizes(
            t,
            text.len(),
            null(),
            bad.as_ptr().cast(),
            sizes.as_mut_ptr(),
            8,
            &mut n,
            null_mut(),
        );
        expect(s, da_status::InvalidArgument, "layer: not UTF-8");
        let s = da_load_group_sizes(
            t,
            text.len(),
            bad.as_ptr().cast(),
            layer,
            sizes.as_mut_ptr(),
            8,
            &mut n,
            null_mut(),
        );
        expect(s, da_status::InvalidArgument, "file: not UTF-8");
    }
    assert_eq!((sizes, n), ([0; 8], 0), "nothing written on error");
}
