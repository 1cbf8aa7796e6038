use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar on stderr with rate and ETA (hidden when stderr is not a terminal).
pub fn bar(len: u64, unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{bar:40}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
        ))
        .expect("static template"),
    );
    pb
}
