//! The Kubernetes source: node-scoped reflectors on pods and a reflector on namespaces, feeding
//! the pure selection.
pub mod select;
