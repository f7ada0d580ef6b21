//! Writing an output file (`--output`, `--svg`, `--markdown`, `--export`, `record`'s output):
//! a regular file is replaced atomically, anything else (a device, a FIFO) is written in place.
//!
//! A plain "write a temporary file, rename it over the target" replaces `/dev/null` or a FIFO
//! with a regular file, replaces a symlink instead of the file it points to, and resets the
//! file's permission bits; this module decides per target what writing it means.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::Fail;

/// Refuses, before any work (a backtest may run for minutes), an output that cannot be
/// written: an existing directory, a file in a directory that does not exist or cannot be
/// written to (where the end of a symlink chain lands), or one of the inputs (`eval
/// --placement p.json --svg p.json` would replace the placement with a heatmap). `flag` names
/// the output in the message.
pub(crate) fn check_output(out: &Path, flag: &str, inputs: &[Option<&Path>]) -> Result<(), Fail> {
    let shown = out.display();
    if out.is_dir() {
        return Err(Fail(format!(
            "{flag} {shown} is a directory: give a file name"
        )));
    }
    refuse_overwrite(out, flag, inputs)?;
    match target_of(out) {
        Ok(Target::Replace { path, .. }) => {
            let dir = parent_dir(&path);
            if !dir.is_dir() {
                return Err(Fail(format!(
                    "{flag} {shown}: the directory {} does not exist",
                    dir.display()
                )));
            }
            // The temporary the output is written to is created there: try it now.
            let (probe, file) = create_temp(&path).map_err(|e| {
                Fail(format!(
                    "{flag} {shown}: cannot write in {}: {e}",
                    dir.display()
                ))
            })?;
            drop(file);
            let _ = std::fs::remove_file(probe);
            Ok(())
        }
        // A device or a FIFO is opened only when written (opening a FIFO waits for a reader).
        Ok(Target::InPlace(_)) => Ok(()),
        Err(e) => Err(Fail(format!("{flag} {shown}: {e}"))),
    }
}

/// Refuses an output directory (`--export DIR`) that exists as something else.
pub(crate) fn check_output_dir(dir: &Path, flag: &str) -> Result<(), Fail> {
    if dir.exists() && !dir.is_dir() {
        return Err(Fail(format!(
            "{flag} {} exists and is not a directory: give a directory",
            dir.display()
        )));
    }
    Ok(())
}

/// The directory a path is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Refuses an output file that is one of the inputs.
fn refuse_overwrite(out: &Path, flag: &str, inputs: &[Option<&Path>]) -> Result<(), Fail> {
    // An output that does not exist yet cannot be an input.
    let Ok(out_real) = out.canonicalize() else {
        return Ok(());
    };
    for input in inputs.iter().flatten() {
        if input.canonicalize().is_ok_and(|i| i == out_real) {
            return Err(Fail(format!(
                "{flag} {} is also an input: writing it would replace that input; choose another file",
                out.display()
            )));
        }
    }
    Ok(())
}

/// How many links a chain may have before it is taken for a loop (Linux's own limit).
const MAX_LINKS: usize = 40;

/// What writing a path means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// Not a regular file (a device, a FIFO, a socket): opened and written in place, since
    /// renaming over it would replace the device with a file.
    InPlace(PathBuf),
    /// A regular file, or none yet: written to a sibling temporary file renamed over it, so a
    /// failure leaves the old contents. `path` is the end of any symlink chain (the link stays
    /// a link); `permissions`: the existing file's, kept on the replacement.
    Replace {
        path: PathBuf,
        permissions: Option<Permissions>,
    },
}

/// Where a write to `path` lands and how it is done.
pub(crate) fn target_of(path: &Path) -> io::Result<Target> {
    let end = follow_links(path)?;
    match std::fs::metadata(&end) {
        Ok(m) if m.is_file() => Ok(Target::Replace {
            path: end,
            permissions: Some(m.permissions()),
        }),
        // A directory is in place too: opening it for writing fails with "Is a directory".
        Ok(_) => Ok(Target::InPlace(end)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Target::Replace {
            path: end,
            permissions: None,
        }),
        Err(e) => Err(e),
    }
}

/// The path at the end of `path`'s symlink chain, followed link by link (not canonicalized:
/// a dangling link resolves to the file it would create, in the directory it names).
fn follow_links(path: &Path) -> io::Result<PathBuf> {
    let mut at = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&at)?;
                // A relative link is relative to the directory holding the link.
                at = match at.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            _ => return Ok(at),
        }
    }
    Err(io::Error::other(format!(
        "more than {MAX_LINKS} symbolic links in a row (a loop?)"
    )))
}

/// Writes what `write` produces to `path` (see [`Target`]).
pub(crate) fn write_file(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    match target_of(path)? {
        Target::InPlace(p) => {
            let mut file = OpenOptions::new().write(true).open(p)?;
            write(&mut file)?;
            file.flush()
        }
        Target::Replace { path, permissions } => replace(&path, permissions, write),
    }
}

/// Writes a new sibling of `path` and renames it over `path`; removes it on failure.
fn replace(
    path: &Path,
    permissions: Option<Permissions>,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let (tmp, mut file) = create_temp(path)?;
    let written = (|| {
        // Before the contents: a file kept private is never readable through its temporary.
        if let Some(p) = permissions {
            file.set_permissions(p)?;
        }
        write(&mut file)?;
        file.flush()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// A new file next to `path` named `.{file name}.{pid}[.n].moectl-tmp`: the whole name keeps
/// `x.json` and `x.svg` apart, the process id keeps two moectl runs apart, and `create_new`
/// never opens an existing file, so the temporary can never be an input (inputs exist).
fn create_temp(path: &Path) -> io::Result<(PathBuf, File)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    let dir = parent_dir(path);
    let pid = std::process::id();
    for n in 0..100u32 {
        let suffix = if n == 0 {
            format!("{pid}")
        } else {
            format!("{pid}.{n}")
        };
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{suffix}.moectl-tmp"));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(
        "no free temporary name next to it (remove the .*.moectl-tmp files left there)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let p =
                std::env::temp_dir().join(format!("moectl-outfile-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("temp dir");
            Dir(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn put(path: &Path, text: &str) -> io::Result<()> {
        write_file(path, |w| w.write_all(text.as_bytes()))
    }

    /// The directory's entries, sorted: no temporary left behind.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn creates_and_replaces_a_regular_file() {
        let d = Dir::new("regular");
        let out = d.0.join("x.json");
        put(&out, "one").expect("create");
        put(&out, "two").expect("replace");
        assert_eq!(std::fs::read_to_string(&out).expect("read"), "two");
        assert_eq!(entries(&d.0), ["x.json"]);
    }

    #[test]
    fn a_symlink_stays_a_link_and_its_target_is_updated() {
        let d = Dir::new("symlink");
        let real = d.0.join("real.json");
        std::fs::write(&real, "old").expect("write");
        // A chain of two, the first relative.
        let mid = d.0.join("mid.json");
        std::os::unix::fs::symlink(&real, &mid).expect("link");
        let link = d.0.join("link.json");
        std::os::unix::fs::symlink("mid.json", &link).expect("link");
        put(&link, "new").expect("write through the link");
        assert!(
            std::fs::symlink_metadata(&link)
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        assert!(
            std::fs::symlink_metadata(&mid)
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&real).expect("read"), "new");
        assert_eq!(entries(&d.0), ["link.json", "mid.json", "real.json"]);
    }

    #[test]
    fn a_dangling_symlink_creates_its_target() {
        let d = Dir::new("dangling");
        let link = d.0.join("link.json");
        std::os::unix::fs::symlink("made.json", &link).expect("link");
        put(&link, "x").expect("write");
        assert_eq!(
            std::fs::read_to_string(d.0.join("made.json")).expect("read"),
            "x"
        );
    }

    #[test]
    fn a_symlink_loop_is_an_error_not_a_hang() {
        let d = Dir::new("loop");
        let a = d.0.join("a");
        std::os::unix::fs::symlink("b", &a).expect("link");
        std::os::unix::fs::symlink("a", d.0.join("b")).expect("link");
        assert!(put(&a, "x").is_err());
    }

    #[test]
    fn permissions_are_kept() {
        use std::os::unix::fs::PermissionsExt;
        let d = Dir::new("mode");
        let out = d.0.join("secret.json");
        std::fs::write(&out, "old").expect("write");
        std::fs::set_permissions(&out, Permissions::from_mode(0o600)).expect("chmod");
        put(&out, "new").expect("replace");
        let mode = std::fs::metadata(&out).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&out).expect("read"), "new");
    }

    #[test]
    fn devices_are_written_in_place() {
        // Decided, not written: writing /dev/null as root once replaced it with a file.
        assert_eq!(
            target_of(Path::new("/dev/null")).expect("target"),
            Target::InPlace(PathBuf::from("/dev/null"))
        );
    }

    #[test]
    fn a_fifo_is_written_not_replaced() {
        use std::os::unix::fs::FileTypeExt;
        let d = Dir::new("fifo");
        let fifo = d.0.join("pipe");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("run mkfifo");
        assert!(made.success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read_to_string(fifo).expect("read the fifo"))
        };
        put(&fifo, "through the pipe").expect("write the fifo");
        assert_eq!(reader.join().expect("reader"), "through the pipe");
        assert!(
            std::fs::symlink_metadata(&fifo)
                .expect("meta")
                .file_type()
                .is_fifo()
        );
        assert_eq!(entries(&d.0), ["pipe"]);
    }

    #[test]
    fn the_temporary_is_never_an_existing_file() {
        let d = Dir::new("collide");
        let out = d.0.join("x.json");
        // An input named as the first temporary would be: it must survive.
        let input =
            d.0.join(format!(".x.json.{}.moectl-tmp", std::process::id()));
        std::fs::write(&input, "input").expect("write");
        put(&out, "out").expect("write");
        assert_eq!(std::fs::read_to_string(&input).expect("read"), "input");
        assert_eq!(std::fs::read_to_string(&out).expect("read"), "out");
        // The old scheme's shared name (x.moectl-tmp) is not used either.
        let old = d.0.join("x.moectl-tmp");
        std::fs::write(&old, "input").expect("write");
        put(&d.0.join("x.svg"), "svg").expect("write");
        assert_eq!(std::fs::read_to_string(&old).expect("read"), "input");
    }

    /// The early check looks where the output will land: past a symlink into a directory that
    /// does not exist it refuses, and it leaves no probe behind where it passes.
    #[test]
    fn the_early_check_follows_links_and_leaves_nothing() {
        let d = Dir::new("check");
        let link = d.0.join("out.json");
        std::os::unix::fs::symlink(d.0.join("missing/out.json"), &link).expect("symlink");
        let err = check_output(&link, "--output", &[]).expect_err("refused");
        assert!(err.0.contains("does not exist"), "{}", err.0);
        std::fs::remove_file(&link).expect("unlink");
        assert!(
            check_output(&link, "--output", &[]).is_ok(),
            "a new file in a directory that exists"
        );
        assert!(entries(&d.0).is_empty(), "{:?}", entries(&d.0));
        let dir_err = check_output(&d.0, "--markdown", &[]).expect_err("refused");
        assert!(dir_err.0.contains("is a directory"), "{}", dir_err.0);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let d = Dir::new("fail");
        let out = d.0.join("x.json");
        std::fs::write(&out, "old").expect("write");
        let r = write_file(&out, |w| {
            w.write_all(b"half")?;
            Err(io::Error::other("boom"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read_to_string(&out).expect("read"), "old");
        assert_eq!(entries(&d.0), ["x.json"]);
    }
}
