//! Links `twinbox` as a position-dependent executable, for the reason given in
//! runtime/build.rs: `twinbox run` starts the CLI once per container, and a PIE of this size
//! makes the dynamic loader apply tens of thousands of relocations at each start.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bin=twinbox=-no-pie");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
