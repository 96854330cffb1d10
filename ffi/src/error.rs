//! The panic boundary and the thread-local last-error message.
//!
//! Every exported function runs its body through [`boundary`] (functions that
//! return a status) or [`boundary_or`] (the few that return a value): a panic
//! never unwinds into C, it becomes `DA_STATUS_PANIC` (or the documented
//! fallback value) with a message.

use core::ffi::{c_char, CStr};
use core::fmt::{self, Write as _};
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use distr_attention_core::Error;

use crate::status::da_status;

/// Capacity of the last-error buffer, NUL included. Longer messages are cut.
pub(crate) const MESSAGE_CAPACITY: usize = 512;

/// A fixed buffer per thread: the pointer `da_last_error_message` returns stays
/// valid for the thread's lifetime, only its contents change.
struct Message {
    buf: [u8; MESSAGE_CAPACITY],
    len: usize,
}

impl fmt::Write for Message {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            // Keep one byte for the NUL, and never store an interior NUL.
            if self.len + 1 >= MESSAGE_CAPACITY {
                break;
            }
            self.buf[self.len] = if b == 0 { b'?' } else { b };
            self.len += 1;
        }
        self.buf[self.len] = 0;
        Ok(())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<Message> = const {
        RefCell::new(Message { buf: [0; MESSAGE_CAPACITY], len: 0 })
    };
}

fn set_last_error(args: fmt::Arguments<'_>) {
    LAST_ERROR.with(|m| {
        let mut m = m.borrow_mut();
        m.len = 0;
        m.buf[0] = 0;
        // Writing into the fixed buffer cannot fail.
        let _ = m.write_fmt(args);
    });
}

fn clear_last_error() {
    set_last_error(format_args!(""));
}

/// A failed call: its status and what to tell the caller.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: da_status,
    message: Detail,
}

#[derive(Debug)]
enum Detail {
    Core(Error),
    Text(String),
}

impl Failure {
    pub(crate) fn new(status: da_status, message: impl Into<String>) -> Self {
        Failure { status, message: Detail::Text(message.into()) }
    }

    /// The same failure with `prefix` before its message (e.g. which calibration sample).
    pub(crate) fn context(self, prefix: impl fmt::Display) -> Self {
        Failure { status: self.status, message: Detail::Text(format!("{prefix}: {self}")) }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure { status: da_status::of_error(&e), message: Detail::Core(e) }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.message {
            Detail::Core(e) => e.fmt(f),
            Detail::Text(s) => f.write_str(s),
        }
    }
}

pub(crate) type FfiResult<T = ()> = Result<T, Failure>;

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// Runs the body of a status-returning function: clears the last error, maps an
/// error to its status and message, and a panic to `DA_STATUS_PANIC`.
pub(crate) fn boundary(body: impl FnOnce() -> FfiResult) -> da_status {
    clear_last_error();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => da_status::Ok,
        Ok(Err(failure)) => {
            set_last_error(format_args!("{failure}"));
            failure.status
        }
        Err(payload) => {
            set_last_error(format_args!(
                "internal error (please report): the library panicked: {}",
                panic_message(&*payload)
            ));
            da_status::Panic
        }
    }
}

/// Runs the body of a function that returns a value rather than a status; a
/// panic gives `fallback`. The last error is left alone.
pub(crate) fn boundary_or<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// The message of the last failed call on the calling thread, or "" if the last
/// call succeeded.
///
/// Every function that returns a `da_status` first clears the message, and sets
/// it when it fails; the message names the offending argument and says why (for
/// example "q: dimension seq is zero"). `da_status_string`, `da_version`,
/// `da_version_number`, `da_last_error_message` and `da_last_error_copy` leave
/// it alone.
///
/// The returned pointer is never NULL, NUL-terminated, owned by the library and
/// must not be freed. It stays valid until the calling thread exits, but its
/// contents change with the thread's next call of a status-returning function:
/// copy the text (or use `da_last_error_copy`) before calling again. Messages
/// are at most 511 bytes.
#[no_mangle]
pub extern "C" fn da_last_error_message() -> *const c_char {
    static EMPTY: &CStr = c"";
    // `with` fails only while the thread is being torn down.
    boundary_or(EMPTY.as_ptr(), || {
        LAST_ERROR.try_with(|m| m.borrow().buf.as_ptr().cast::<c_char>()).unwrap_or(EMPTY.as_ptr())
    })
}

/// Copies the calling thread's last-error message into `buf`, like `snprintf`:
/// writes at most `buf_len - 1` bytes and a terminating NUL (nothing if
/// `buf_len` is 0), and returns the length of the whole message, without the
/// NUL. A return value `>= buf_len` means the copy was cut.
///
/// # Safety
/// `buf` must be NULL (then nothing is written) or point to `buf_len` writable
/// bytes (not the read-only string of `da_last_error_message`). The library
/// keeps no reference to it.
#[no_mangle]
pub unsafe extern "C" fn da_last_error_copy(buf: *mut c_char, buf_len: usize) -> usize {
    boundary_or(0, || {
        LAST_ERROR
            .try_with(|m| {
                let m = m.borrow();
                if !buf.is_null() && buf_len > 0 {
                    let n = m.len.min(buf_len - 1);
                    // SAFETY: the caller provides `buf_len` writable bytes at `buf`.
                    // `copy` (memmove) also allows `buf` to be the thread's own buffer.
                    unsafe {
                        core::ptr::copy(m.buf.as_ptr().cast::<c_char>(), buf, n);
                        *buf.add(n) = 0;
                    }
                }
                m.len
            })
            .unwrap_or(0)
    })
}

#[cfg(test)]
pub(crate) fn last_error() -> String {
    LAST_ERROR.with(|m| {
        let m = m.borrow();
        String::from_utf8_lossy(&m.buf[..m.len]).into_owned()
    })
}
