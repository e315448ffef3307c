//! `drover install DIR`: copies this very binary to `DIR/drover`, so that an
//! initContainer running the drover image (which has no shell and no `cp`)
//! can put drover into an `emptyDir` that an unmodified app image then runs
//! from. Owns nothing but that one copy; it never runs or supervises anything.
//!
//! The copy is atomic: it is written to a temporary file in DIR, made
//! executable (0755, whatever the umask), flushed, and renamed over
//! `DIR/drover`. A reader of `DIR/drover` (a container starting while the
//! initContainer is restarted, say) sees the old complete file or the new
//! complete one, never a half-written binary. A DIR that is missing, not a
//! directory, or not writable is a user error with exit code 73
//! (`EX_CANTCREAT`, "cannot create the output file").

#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The mode of the installed binary: executable by every user, since the app
/// container may run as a user other than the initContainer's.
const MODE: u32 = 0o755;

/// Copies the running executable to `dir/drover` atomically and returns the
/// path written.
pub fn install(dir: &Path) -> Result<PathBuf> {
    let cant = |reason: String| Error::Install {
        dir: dir.to_path_buf(),
        reason,
    };
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(cant("it is not a directory".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(cant(
                "it does not exist (mount a volume there, e.g. an emptyDir)".into(),
            ))
        }
        Err(e) => return Err(cant(e.to_string())),
    }
    // /proc/self/exe is the file this process runs, even if it was renamed
    // or replaced since.
    let exe = Path::new("/proc/self/exe");
    let mut src = File::open(exe).map_err(|e| Error::io("cannot open /proc/self/exe", e))?;

    let dest = dir.join("drover");
    // Hidden and unique to this process, in DIR itself so that the rename
    // stays on one filesystem (rename(2) is atomic only there).
    let tmp = dir.join(format!(".drover.install-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| -> io::Result<()> {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(MODE)
            .open(&tmp)?;
        io::copy(&mut src, &mut out)?;
        // The umask may have removed bits from `mode` above.
        out.set_permissions(fs::Permissions::from_mode(MODE))?;
        out.flush()?;
        out.sync_all()?;
        fs::rename(&tmp, &dest)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(cant(format!(
            "cannot write {} there: {e} (is it writable by this user?)",
            tmp.display()
        )));
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("drover-install-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn copies_this_executable_with_mode_0755_and_leaves_no_temporary_file() {
        let d = tempdir("ok");
        // An older file in the way is replaced, not appended to.
        fs::write(d.join("drover"), b"old").unwrap();
        let dest = install(&d).unwrap();
        assert_eq!(dest, d.join("drover"));
        let want = fs::read("/proc/self/exe").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), want);
        let mode = fs::metadata(&dest).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, MODE);
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["drover"]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_missing_dir_or_a_file_is_a_cantcreat_error_naming_it() {
        let d = tempdir("bad");
        let missing = d.join("missing");
        let e = install(&missing).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::exit::CANTCREAT);
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        let file = d.join("file");
        fs::write(&file, b"").unwrap();
        let e = install(&file).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::exit::CANTCREAT);
        assert!(e.to_string().contains("not a directory"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }
}
