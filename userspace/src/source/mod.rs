//! Where the desired node state comes from: the Kubernetes API (the DaemonSet) or a file (labs).
pub mod file;
pub mod kube;
