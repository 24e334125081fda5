//! Links `twinbox` as a position-dependent executable, for the reason given in
//! runtime/build.rs: `twinbox run` starts the CLI once per container, and a PIE of this size
//! makes the dynamic loader apply tens of thousands of relocations at each start.

fn main() {
    let static_pie = std::env::var("CARGO_CFG_TARGET_FEATURE").is_ok_and(|f| f.split(',').any(|f| f == "crt-static"));
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") && !static_pie {
        println!("cargo:rustc-link-arg-bin=twinbox=-no-pie");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
