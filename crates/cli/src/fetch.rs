use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Asset names (models: smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b; texts: wiki,
    /// wiki-calib, wiki-heldout, c4, code, tiny, technical, multilingual; zero-shot tasks: piqa,
    /// arc_easy, arc_challenge, hellaswag, winogrande, boolq, lambada). None: all of them.
    names: Vec<String>,
    /// List the known assets and where they are cached, without fetching.
    #[arg(long)]
    list: bool,
}

pub fn main(args: Args) -> Result<()> {
    if args.list {
        println!("cache: {}", recoup_assets::cache_dir().display());
        for a in recoup_assets::ASSETS {
            println!("{:<20} {:?}  {}", a.name, a.kind, a.description);
        }
        return Ok(());
    }
    for (name, path, status) in recoup_assets::fetch_all_names(&args.names)? {
        println!("{name:<20} {status:<18} {}", path.display());
    }
    Ok(())
}
