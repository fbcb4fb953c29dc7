//! Wire formats shared by agent, coordinator and relay. Filled in by the control-plane and relay issues.
