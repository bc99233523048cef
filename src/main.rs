//! The `pcache` command. All the work is in the library; see `cli.rs`.

fn main() {
    std::process::exit(pcache::cli::main());
}
