"""The flagship task pack: personalised training programs for airline pilots and cabin crew."""
