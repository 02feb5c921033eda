"""From probabilities to decisions: calibration, operating points and referral, fitted on validation."""
