//! KVM microVM launcher (filled by the microVM issue).
