//! Compiles `src/bpf/snoop.bpf.c` with clang and generates the skeleton.
fn main() {
    leakscope_bpf::build::skeleton("src/bpf/snoop.bpf.c", "snoop", &["src/bpf/snoop.h"]);
}
