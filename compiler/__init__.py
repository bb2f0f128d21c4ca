"""ldpruner.compiler: trace a UNet into an fx graph of operators and describe it as an OperatorGraph."""
