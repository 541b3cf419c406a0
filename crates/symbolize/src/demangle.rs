//! Mangled names made readable, and only mangled ones (issue 14).
//!
//! A name is demangled when it is mangled: `_Z...` (Itanium C++) by
//! libiberty, the demangler of c++filt, addr2line and gdb, so a name reads
//! exactly as those tools print it; `_R...` (Rust v0) and Rust's legacy
//! `_ZN...17h<16 hex digits>E` by rustc-demangle, without the hash. Any
//! other name is returned as it is: a C function `f` stays `f`, where a
//! demangler that accepts bare type encodings would say `float`.

use std::borrow::Cow;
use std::ffi::{c_char, c_int, c_void, CStr, CString};

/// libiberty's `demangle.h`: include the parameters, and `const`,
/// `volatile`; expand `std::string` and friends in full, as c++filt does.
const DMGL_PARAMS: c_int = 1 << 0;
const DMGL_ANSI: c_int = 1 << 1;
const DMGL_VERBOSE: c_int = 1 << 3;

extern "C" {
    /// libiberty's `cp-demangle.c`: a `malloc`ed string, or NULL when
    /// `mangled` is not a mangled C++ name. Reentrant: it keeps no state.
    fn cplus_demangle_v3(mangled: *const c_char, options: c_int) -> *mut c_char;
    fn free(ptr: *mut c_void);
}

/// `name` demangled if it is a mangled C++ or Rust name, else as it is.
///
/// ```
/// use leakscope_symbolize::demangle;
///
/// assert_eq!(demangle("f"), "f"); // C: never read as the type `float`
/// assert_eq!(demangle("_ZN5outer3LogclEPKc"), "outer::Log::operator()(char const*)");
/// assert_eq!(demangle("_ZN9rust_leak11cache_names17h0123456789abcdefE"), "rust_leak::cache_names");
/// ```
pub fn demangle(name: &str) -> Cow<'_, str> {
    if name.starts_with("_R") || is_rust_legacy(name) {
        if let Ok(d) = rustc_demangle::try_demangle(name) {
            // `{:#}` leaves out the hash, which only tells builds apart.
            return Cow::Owned(format!("{d:#}"));
        }
    }
    if name.starts_with("_Z") {
        if let Some(d) = demangle_cxx(name) {
            return Cow::Owned(d);
        }
    }
    Cow::Borrowed(name)
}

/// Rust's legacy mangling is Itanium's `_ZN...E` whose last component is
/// `17h` and a 16-digit hash; a `.llvm.123`-style suffix may follow.
fn is_rust_legacy(name: &str) -> bool {
    let Some(body) = name.strip_prefix("_ZN") else {
        return false;
    };
    let body = body.split('.').next().unwrap_or(body).as_bytes();
    let Some(body) = body.strip_suffix(b"E") else {
        return false;
    };
    body.len() >= 19
        && body[body.len() - 19..].starts_with(b"17h")
        && body[body.len() - 16..].iter().all(u8::is_ascii_hexdigit)
}

fn demangle_cxx(name: &str) -> Option<String> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let out = unsafe { cplus_demangle_v3(c.as_ptr(), DMGL_PARAMS | DMGL_ANSI | DMGL_VERBOSE) };
    if out.is_null() {
        return None;
    }
    // SAFETY: non-NULL results are NUL-terminated strings from malloc(3),
    // ours to free once copied.
    let s = unsafe { CStr::from_ptr(out) }
        .to_string_lossy()
        .into_owned();
    unsafe { free(out.cast()) };
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_not_mangled_stay_as_they_are() {
        // cpp_demangle reads these as types: float, __float128, unsigned
        // char, int, void, std::string.
        for name in [
            "f",
            "g",
            "h",
            "i",
            "v",
            "Ss",
            "ab",
            "main",
            "_start",
            "operator()",
        ] {
            assert_eq!(demangle(name), name);
        }
        // Prefixes alone do not make a mangled name.
        assert_eq!(demangle("_Zork"), "_Zork");
        assert_eq!(demangle("_Rx"), "_Rx");
    }

    #[test]
    fn cxx_names_read_as_cxxfilt_prints_them() {
        let cases = [
            // Reference collapsing in a pack expansion (issue 14).
            (
                "_ZNSt6threadC2IRFvvEJEvEEOT_DpOT0_",
                "std::thread::thread<void (&)(), , void>(void (&)())",
            ),
            // Lambda: the closure keeps its enclosing function.
            (
                "_ZZN5outer10run_lambdaEPKcENKUliE_clEi",
                "outer::run_lambda(char const*)::{lambda(int)#1}::operator()(int) const",
            ),
            // std::string in full, as c++filt (not llvm-cxxfilt) prints it.
            (
                "_ZNKSs2atEm",
                "std::basic_string<char, std::char_traits<char>, std::allocator<char> >::at(unsigned long) const",
            ),
            (
                "_ZN5outer12via_functionEPKc.cold",
                "outer::via_function(char const*) [clone .cold]",
            ),
        ];
        for (mangled, want) in cases {
            assert_eq!(demangle(mangled), want, "{mangled}");
        }
    }

    #[test]
    fn rust_names_lose_their_hash() {
        assert_eq!(
            demangle("_ZN3std2rt10lang_start17h1a2b3c4d5e6f7a8bE.llvm.42"),
            "std::rt::lang_start"
        );
        assert_eq!(demangle("_RNvCs1234_7mycrate3foo"), "mycrate::foo");
        // Itanium names that merely start like Rust's are C++.
        assert_eq!(demangle("_ZN3foo3barEv"), "foo::bar()");
    }
}
