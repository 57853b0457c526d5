//! `train`: shards → checkpoint, in this process or as data-parallel ranks.

use std::path::PathBuf;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Args;
use minimind_v::{checkpoint, config, device, train};

#[derive(Args)]
pub struct TrainArgs {
    pipeline: PathBuf,
    /// Override a setting: --set train.steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from out/checkpoint exactly where it stopped.
    #[arg(long)]
    resume: bool,
    /// Start over in an `out` that holds a run (its checkpoint and logs are replaced).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// With --resume: continue even though settings that change what the run computes (learning
    /// rate, steps, batch, …) differ from the checkpoint's.
    #[arg(long, requires = "resume")]
    force: bool,
    /// Stop (with a checkpoint) after this many steps of this run.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Data parallel: start this many processes (rank r on cuda:r, or all on cpu), each on
    /// its share of the shards, gradients averaged every step.
    #[arg(long, alias = "gpus", default_value_t = 1)]
    ranks: usize,
    #[arg(long, default_value = "auto")]
    device: String,
}

/// The first Ctrl-C sets the returned flag (the run stops at the next step with a checkpoint);
/// a second one exits at once.
pub fn ctrl_c() -> anyhow::Result<Arc<AtomicBool>> {
    use signal_hook::consts::SIGINT;
    let flag = Arc::new(AtomicBool::new(false));
    // Registered first, so it runs first: exit if a Ctrl-C came before this one.
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, flag.clone())?;
    signal_hook::flag::register(SIGINT, flag.clone())?;
    Ok(flag)
}

impl TrainArgs {
    pub fn run(self) -> anyhow::Result<()> {
        if self.ranks > 1 {
            // This program again, once per rank, with the same arguments.
            let mut args = vec!["train".to_string(), self.pipeline.display().to_string()];
            for o in &self.overrides {
                args.extend(["--set".to_string(), o.clone()]);
            }
            for (on, flag) in [
                (self.resume, "--resume"),
                (self.overwrite, "--overwrite"),
                (self.force, "--force"),
            ] {
                if on {
                    args.push(flag.into());
                }
            }
            if let Some(n) = self.stop_after {
                args.extend(["--stop-after".to_string(), n.to_string()]);
            }
            train::dist::launch(self.ranks, &self.device, &args)?;
            return Ok(());
        }
        let cfg = config::load_section(&self.pipeline, &self.overrides, "train", |p| p.train)?;
        let opts = train::RunOptions {
            interrupt: Some(ctrl_c()?),
            resume: self.resume,
            overwrite: self.overwrite,
            force: self.force,
            stop_after: self.stop_after,
            progress: true,
            device: device::select(&self.device)?,
        };
        let dist = train::dist::from_env(&opts.device)?;
        let (logs, _) = train::run_dist(&cfg, &opts, &dist)?;
        if let Some(last) = logs.last().filter(|_| dist.is_main()) {
            println!(
                "step {} loss {:.4} ({:.0} tokens/s); checkpoint: {}",
                last.step,
                last.loss,
                last.tokens_per_s,
                checkpoint::dir(&cfg.out).display()
            );
        }
        Ok(())
    }
}
