// `sqlx::migrate!` embeds the migrations at compile time, but cargo does not know to
// rebuild when one is added: without this, an incremental build ships the old set.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
