fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.starts_with("aarch64-unknown-none") {
        println!("cargo:rustc-link-arg-bins=-T{dir}/../linker/hyp.ld");
        println!("cargo:rustc-link-arg-bins=-pie");
        println!("cargo:rustc-link-arg-bins=--no-dynamic-linker");
        println!("cargo:rustc-link-arg-bins=-znotext");
    }
    println!("cargo:rerun-if-changed=../linker/hyp.ld");
    println!("cargo:rerun-if-changed=src/entry.S");
}
