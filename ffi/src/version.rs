//! The version query.

use core::ffi::{c_char, CStr};

use crate::error::boundary_or;

const VERSION: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
    Ok(v) => v,
    Err(_) => panic!("the package version contains a NUL"),
};

const fn parse(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut n = 0u32;
    while i < b.len() {
        assert!(b[i].is_ascii_digit(), "version component is not a number");
        n = n * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    n
}

/// `major * 10000 + minor * 100 + patch`.
pub(crate) const VERSION_NUMBER: u32 = parse(env!("CARGO_PKG_VERSION_MAJOR")) * 10000
    + parse(env!("CARGO_PKG_VERSION_MINOR")) * 100
    + parse(env!("CARGO_PKG_VERSION_PATCH"));

/// The library's version as "MAJOR.MINOR.PATCH". Static, never NULL, must not
/// be freed.
#[no_mangle]
pub extern "C" fn da_version() -> *const c_char {
    boundary_or(VERSION.as_ptr(), || VERSION.as_ptr())
}

/// The library's version as `major * 10000 + minor * 100 + patch` (0.1.0 is
/// 100), for run-time checks against the version a program was built for.
#[no_mangle]
pub extern "C" fn da_version_number() -> u32 {
    boundary_or(VERSION_NUMBER, || VERSION_NUMBER)
}
