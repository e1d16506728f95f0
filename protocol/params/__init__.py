"""Parameter models of the methods both sides validate: attacks, APEM, the filter and SIS."""
