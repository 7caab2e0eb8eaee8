//! `zdivert-cni`: the CNI plugin the runtime chains after the primary one (`zdivert::cni`).
use std::io::Read as _;

use zdivert::cni::plugin::{self, CniError, Env, code};

fn main() -> std::process::ExitCode {
    let env = Env::from_process();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => plugin::run(&env, &stdin, &plugin::Node),
        Err(e) => Err((
            CniError::new(code::IO_FAILURE, "reading stdin", e.to_string()),
            "1.1.0".into(),
        )),
    };
    match outcome {
        Ok(serde_json::Value::Null) => std::process::ExitCode::SUCCESS,
        Ok(result) => {
            println!("{result}");
            std::process::ExitCode::SUCCESS
        }
        Err((error, version)) => {
            println!("{}", error.to_json(&version));
            std::process::ExitCode::FAILURE
        }
    }
}
