//! Per-round samples folded into medians with their spread.
use std::collections::BTreeMap;

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub section: &'static str,
    /// What was measured against what: `same-node/b-ebpf`, `10k pods/zd_outbound`, ...
    pub case: String,
    pub metric: &'static str,
    pub unit: &'static str,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
}

#[derive(Default)]
pub struct Samples {
    by_key: BTreeMap<(&'static str, String, &'static str, &'static str), Vec<f64>>,
    order: Vec<(&'static str, String, &'static str, &'static str)>,
}

impl Samples {
    pub fn add(
        &mut self,
        section: &'static str,
        case: &str,
        metric: &'static str,
        unit: &'static str,
        v: f64,
    ) {
        let key = (section, case.to_string(), metric, unit);
        if !self.by_key.contains_key(&key) {
            self.order.push(key.clone());
        }
        self.by_key.entry(key).or_default().push(v);
    }

    pub fn figures(&self) -> Vec<Figure> {
        self.order
            .iter()
            .map(|k| {
                let mut v = self.by_key[k].clone();
                v.sort_by(|a, b| a.total_cmp(b));
                let median = if v.len() % 2 == 1 {
                    v[v.len() / 2]
                } else {
                    (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
                };
                Figure {
                    section: k.0,
                    case: k.1.clone(),
                    metric: k.2,
                    unit: k.3,
                    median,
                    min: v[0],
                    max: v[v.len() - 1],
                    samples: v.len(),
                }
            })
            .collect()
    }
}

pub fn find<'a>(figs: &'a [Figure], case: &str, metric: &str) -> Option<&'a Figure> {
    figs.iter().find(|f| f.case == case && f.metric == metric)
}
