//! `--key value` / `--flag` argument parsing; unknown options are errors.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

/// Options that take no value.
const FLAGS: &[&str] = &["strict", "keep", "keepalive", "floor", "tls"];

pub struct Args {
    values: BTreeMap<String, Vec<String>>,
    flags: BTreeSet<String>,
    used: RefCell<BTreeSet<String>>,
}

impl Args {
    pub fn parse(argv: &[String]) -> Result<Args, String> {
        let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut flags = BTreeSet::new();
        let mut it = argv.iter();
        while let Some(a) = it.next() {
            let Some(key) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}"));
            };
            if let Some((k, v)) = key.split_once('=') {
                values.entry(k.to_string()).or_default().push(v.to_string());
            } else if FLAGS.contains(&key) {
                flags.insert(key.to_string());
            } else {
                let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
                values.entry(key.to_string()).or_default().push(v.clone());
            }
        }
        Ok(Args { values, flags, used: RefCell::new(BTreeSet::new()) })
    }

    pub fn str_opt(&self, key: &str) -> Option<String> {
        self.used.borrow_mut().insert(key.to_string());
        self.values.get(key).and_then(|v| v.last().cloned())
    }

    pub fn all(&self, key: &str) -> Vec<String> {
        self.used.borrow_mut().insert(key.to_string());
        self.values.get(key).cloned().unwrap_or_default()
    }

    pub fn string(&self, key: &str, default: &str) -> String {
        self.str_opt(key).unwrap_or_else(|| default.to_string())
    }

    pub fn num<T: FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        match self.str_opt(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{key}: bad value {v:?}")),
        }
    }

    pub fn flag(&self, key: &str) -> bool {
        self.used.borrow_mut().insert(key.to_string());
        self.flags.contains(key)
    }

    /// Fails on options nobody asked for (typos).
    pub fn finish(&self) -> Result<(), String> {
        let used = self.used.borrow();
        let unknown: Vec<_> = self
            .values
            .keys()
            .chain(self.flags.iter())
            .filter(|k| !used.contains(*k))
            .map(|k| format!("--{k}"))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(format!("unknown option(s): {}", unknown.join(" ")))
        }
    }
}
