//! Compile-time embedding of svcdb migrations. Use it as `svcdb::embed_migrations!`.
//!
//! The macro only reads the folder and emits `include_bytes!` for its files; all parsing and
//! validation happens at run time in `svcdb::migrate::Migrations::from_embedded`, the same code
//! that reads a folder, so an embedded source and a folder behave identically.

use std::path::{Path, PathBuf};

use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, LitStr};

/// Embeds a migrations folder (relative to the calling crate's `Cargo.toml`) in the binary, as
/// a `svcdb::migrate::EmbeddedMigrations` constant expression.
///
/// ```ignore
/// static MIGRATIONS: svcdb::migrate::EmbeddedMigrations = svcdb::embed_migrations!("migrations");
///
/// let migrations = svcdb::migrate::Migrations::from_embedded(&MIGRATIONS)?;
/// ```
///
/// Every file of the folder and of its direct sub-folders (the diesel layout) is embedded with
/// `include_bytes!`, so editing a file rebuilds the crate. Adding or removing a file is not
/// seen by Cargo on its own: add a `build.rs` with
/// `println!("cargo:rerun-if-changed=migrations");` to rebuild on those too.
/// Hidden files (`.gitkeep`, editor swap files) are skipped.
#[proc_macro]
pub fn embed_migrations(input: TokenStream) -> TokenStream {
    let dir = parse_macro_input!(input as LitStr);
    match expand(&dir) {
        Ok(tokens) => tokens.into(),
        Err(message) => syn::Error::new(dir.span(), message)
            .to_compile_error()
            .into(),
    }
}

fn expand(dir: &LitStr) -> Result<proc_macro2::TokenStream, String> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")
        .map_err(|_| "CARGO_MANIFEST_DIR is not set: build with Cargo".to_owned())?;
    let root = Path::new(&manifest_dir).join(dir.value());
    let files = collect(&root)
        .map_err(|e| format!("cannot read migrations folder {}: {e}", root.display()))?;
    let entries = files.iter().map(|(rel, abs)| {
        let abs = abs.to_str().expect("checked to be UTF-8 in collect");
        quote! { ::svcdb::migrate::EmbeddedFile { path: #rel, contents: include_bytes!(#abs) } }
    });
    let shown = dir.value();
    Ok(quote! {
        ::svcdb::migrate::EmbeddedMigrations::new(#shown, &[ #(#entries),* ])
    })
}

/// `(relative path with '/', absolute path)` of every non-hidden file in `root` and in its
/// direct sub-folders, sorted.
fn collect(root: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    walk(root, "", &mut vec![std::fs::canonicalize(root)?], &mut out)?;
    out.sort();
    Ok(out)
}

/// Folders read below the migrations folder, as `Migrations::from_dir` reads them (Flyway
/// scans every depth of its locations); deeper is an error there and here.
const MAX_DEPTH: usize = 16;

/// The files of `dir` (named `prefix` + their name) and of its sub-folders, at every depth
/// down to [`MAX_DEPTH`]; a link to a folder it is inside (`ancestors`) is read once, not
/// forever, and a link out of the migrations folder (`ancestors[0]`) is not followed.
fn walk(
    dir: &Path,
    prefix: &str,
    ancestors: &mut Vec<PathBuf>,
    out: &mut Vec<(String, PathBuf)>,
) -> std::io::Result<()> {
    for (name, path) in entries(dir)? {
        let rel = format!("{prefix}{name}");
        if !path.is_dir() {
            if path.is_file() {
                out.push((rel, path));
            }
            continue;
        }
        let real = std::fs::canonicalize(&path)?;
        // As `Migrations::from_dir`: a link back up is read once, a link out of the folder
        // not at all, and a folder too deep is refused only when it holds `.sql` files.
        if ancestors.contains(&real) || !real.starts_with(&ancestors[0]) {
            continue;
        }
        if ancestors.len() > MAX_DEPTH {
            let holds_sql = entries(&path)?
                .iter()
                .any(|(name, path)| path.is_file() && name.ends_with(".sql"));
            if holds_sql {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{} is more than {MAX_DEPTH} folders down the migrations folder and holds .sql files, deeper than svcdb reads; move its migrations up",
                        path.display()
                    ),
                ));
            }
            continue;
        }
        ancestors.push(real);
        walk(&path, &format!("{rel}/"), ancestors, out)?;
        ancestors.pop();
    }
    Ok(())
}

/// Non-hidden entries of `dir` with UTF-8 names (the path goes into `include_bytes!`, which
/// takes a string).
fn entries(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not a UTF-8 file name; rename it", path.display()),
            ));
        };
        if !name.starts_with('.') {
            out.push((name, path));
        }
    }
    Ok(out)
}
