//! Compiles `src/bpf/uheap.bpf.c` with clang and generates the skeleton.
fn main() {
    leakscope_bpf::build::skeleton("src/bpf/uheap.bpf.c", "uheap", &["src/bpf/uheap.h"]);
}
