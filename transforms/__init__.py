"""How data flows: pure numpy steps and the Beam transforms that adapt them."""
