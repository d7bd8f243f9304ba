// `embed_migrations!` includes each migration file, so editing one rebuilds the binary; adding
// or removing a file is only noticed through this.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=faults");
}
