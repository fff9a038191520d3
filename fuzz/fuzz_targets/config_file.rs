//! TOML configuration files: any text gives flags or an error with a
//! position inside the file, never a panic.
#![no_main]

use std::path::Path;

use clap::CommandFactory;
use greyfed::cli::Cli;
use greyfed::config_file::ConfigFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cli = Cli::command();
    match ConfigFile::parse(Path::new("fuzz.toml"), text, &cli) {
        Ok(file) => {
            for (section, _) in &file.sections {
                let _ = file.dry_run(&cli, section);
            }
        }
        Err(e) => {
            if let Some((line, _)) = e.position {
                assert!(line >= 1 && line <= text.lines().count().max(1) + 1, "{e}");
            }
        }
    }
});
