//! Build script: declares the `loom` cfg, under which the batch hand-off is model-checked
//! (`RUSTFLAGS="--cfg loom" cargo test -p completion --release loom`), so that `unexpected_cfgs`
//! knows it without touching the workspace lints this crate inherits.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(loom)");
}
