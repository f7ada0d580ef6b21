//! The MoEDeployment resource and its controller.
